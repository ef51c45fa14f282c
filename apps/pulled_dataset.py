"""A torch ``Dataset`` over a set written by ``colabel pull``: random crops and flips of (image, mask) pairs.

Needs torch (the ``train`` extra). ``colabel.apps.pull.PulledDataset`` is this class too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from colabel.errors import InvalidInputError

from .pull import NO_CLASS, labelled_pairs

NORMALIZATIONS = ("dtype", "percentile")
CHANNELS = (None, 1, 3)
IGNORE_INDEX = -100
"""Target value of a pixel of an object without a class in ``masks="semantic"`` items (torch's default)."""


class PulledDataset(Dataset):
    """Random square crops, flipped left-right and up-down each with probability 1/2, of a pulled set's images
    and their instance or semantic masks (the same crop and flips for both).

    Parameters
    ----------
    folder : path
        The ``--out`` folder of ``colabel pull`` (reads its ``labels.zarr``; everything is loaded into memory).
    crop : int, default 256
        Side of the crops in pixels; images smaller than that are padded with zeros on the bottom and right
        (mask 0 = background there).
    annotator : str, optional
        Whose masks (a key of ``instances/<image_id>``; images this annotator did not label are left out).
        Default: the consensus where the image has one, else the first annotator in sorted order.
    length : int, default 1000
        Items per epoch; item ``i`` is a crop of image ``i % n_images``.
    seed : int, default 0
        Seeds the crops and flips. In the main process one generator runs on across epochs; in a
        ``DataLoader`` worker the generator is seeded from ``seed`` and the worker's own seed (which the
        loader draws afresh per epoch from torch's generator), so workers never repeat each other's crops.
    normalize : {"percentile", "dtype"}, default "percentile"
        ``"percentile"``: per image and channel ``(x - p1) / (p99.8 - p1 + 1e-6)``, not clipped: exactly what
        colabel's segmenter training does (:func:`~colabel.services.training.segmenter_training.normalize_image`,
        bioimage.io's ``scale_range``), whatever range of its dtype an image uses (a 16-bit image holding 0-235
        spans 0-1 as an 8-bit one does). ``"dtype"``: integer images divided by their dtype's maximum
        (uint8 / 255, uint16 / 65535), float images as stored.
    channels : {None, 1, 3}, default None
        ``None``: each image's channels as stored (a set mixing grey and RGB then gives items of 1 and 3
        channels, which a ``DataLoader`` cannot batch). ``1`` or ``3``: every image converted as colabel's
        training and prediction convert it for a model of that many channels
        (:func:`~colabel.services.training.segmenter_training.to_model_channels`: grey repeated to RGB, RGBA
        to RGB, colour to grey as the mean of its first three channels), before ``"percentile"`` scaling
        (after ``"dtype"`` scaling).
    masks : {"instances", "semantic"}, default "instances"
        ``"instances"``: each object its own value. ``"semantic"``: the class of each pixel, for a
        multi-class segmenter: class index + 1 (the session's classes in order, 0 = background), and
        :data:`IGNORE_INDEX` (-100, ``torch.nn.CrossEntropyLoss``'s default ``ignore_index``) on objects without
        a class (drawn unclassified, a consensus tie, or a consensus object nobody classified), so a loss leaves
        them out instead of learning them as background. ``classes`` lists the class names (value k is
        ``classes[k - 1]``).

    Items are ``(image, mask)``: image float32 tensor ``(C, crop, crop)``, mask int64 tensor ``(crop, crop)``
    (0 = background; padding is background too). ``image_ids`` lists the images, in the order of ``pairs``.

    Raises
    ------
    InvalidInputError
        No labelled image in the set (or none by ``annotator``), ``crop`` or ``length`` not a positive integer,
        an unknown ``normalize``, ``channels`` other than None, 1 or 3, an image that cannot be converted to
        ``channels`` (2 channels to 3), ``masks`` other than "instances" or "semantic", semantic masks of a set
        pulled by a colabel before they marked objects without a class (pull it again).

    Examples
    --------
    >>> loader = DataLoader(PulledDataset("pulled", crop=128, channels=3), batch_size=8)  # doctest: +SKIP
    >>> next(iter(loader))[0].shape                                                      # doctest: +SKIP
    torch.Size([8, 3, 128, 128])
    """

    def __init__(self, folder: str | Path, *, crop: int = 256, annotator: str | None = None, length: int = 1000,
                 seed: int = 0, normalize: str = "percentile", channels: int | None = None,
                 masks: str = "instances") -> None:
        for name, value in (("crop", crop), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        if isinstance(channels, bool) or channels not in CHANNELS:
            raise InvalidInputError(f"channels must be None (as stored), 1 or 3, got {channels!r}")
        channels = None if channels is None else int(channels)
        pulled = labelled_pairs(folder, annotator, masks)
        self.image_ids: list[str] = [image_id for image_id, _, _ in pulled]
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = [
            (_scaled(image, normalize, channels), mask) for _, image, mask in pulled]  # masks as stored (uint)
        self.classes: list[str] = _class_names(folder)
        if not self.pairs:
            whose = f" by annotator {annotator!r}" if annotator is not None else ""
            raise InvalidInputError(f"no labelled images{whose} in {folder}")
        self.crop, self.length, self.seed, self.masks = int(crop), int(length), int(seed), masks
        self._rng = np.random.default_rng(self.seed)
        self._rng_worker: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = self._generator()
        image, mask = self.pairs[index % len(self.pairs)]
        h, w = mask.shape
        c = self.crop
        y = int(rng.integers(0, max(1, h - c + 1)))
        x = int(rng.integers(0, max(1, w - c + 1)))
        img, msk = image[y:y + c, x:x + c], _targets(mask[y:y + c, x:x + c], self.masks)
        pad = ((0, c - msk.shape[0]), (0, c - msk.shape[1]))
        img, msk = np.pad(img, (*pad, (0, 0))), np.pad(msk, pad)
        if rng.random() < 0.5:
            img, msk = img[:, ::-1], msk[:, ::-1]
        if rng.random() < 0.5:
            img, msk = img[::-1], msk[::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(msk.copy())

    def _generator(self) -> np.random.Generator:
        """The main process's generator, or in a DataLoader worker one seeded from ``seed`` and the worker's seed
        (a fresh generator whenever the worker or its seed changes: each epoch's new workers draw new crops)."""
        info = get_worker_info()
        if info is None:
            return self._rng
        key = (info.id, info.seed)
        if key != self._rng_worker:
            self._rng_worker = key
            self._rng = np.random.default_rng([self.seed, info.seed])
        return self._rng


def _targets(mask: np.ndarray, masks: str) -> np.ndarray:
    """A crop of a pulled mask as the int64 targets of an item: semantic masks' :data:`~colabel.apps.pull.NO_CLASS`
    is :data:`IGNORE_INDEX`."""
    out = mask.astype(np.int64)
    if masks == "semantic":
        out[mask == NO_CLASS] = IGNORE_INDEX
    return out


def _class_names(folder: str | Path) -> list[str]:
    """The session's class names, in the order of the semantic masks' values (``labels.zarr``'s attributes)."""
    import zarr

    return list(zarr.open_group(str(Path(folder) / "labels.zarr"), mode="r").attrs.get("classes", []))


def _scaled(image: np.ndarray, normalize: str, channels: int | None = None) -> np.ndarray:
    """``(H, W, C)`` float32 image converted to ``channels`` and scaled as ``normalize`` says (see
    :class:`PulledDataset`); colabel's training's own functions, so the two see an image alike."""
    from colabel.services.training.segmenter_training import normalize_image, to_model_channels

    if normalize == "percentile":
        image = image if channels is None else to_model_channels(image, channels)
        return np.moveaxis(normalize_image(image), 0, -1)
    out = image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        out /= np.iinfo(image.dtype).max
    out = out if channels is None else to_model_channels(out, channels).astype(np.float32)
    return out[..., None] if out.ndim == 2 else out
