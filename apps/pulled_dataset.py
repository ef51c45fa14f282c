"""A torch ``Dataset`` over a set written by ``colabel pull``: random crops and flips of (image, mask) pairs.

Needs torch (the ``train`` extra). ``colabel.apps.pull.PulledDataset`` is this class too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from colabel.errors import InvalidInputError

from .pull import labelled_pairs

NORMALIZATIONS = ("dtype", "percentile")


class PulledDataset(Dataset):
    """Random square crops, flipped left-right and up-down each with probability 1/2, of a pulled set's images
    and their instance masks (the same crop and flips for both).

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
    normalize : {"dtype", "percentile"}, default "dtype"
        ``"dtype"``: integer images divided by their dtype's maximum (uint8 / 255, uint16 / 65535), float
        images as stored. ``"percentile"``: per image and channel ``(x - p1) / (p99.8 - p1)``, not clipped
        (what colabel's segmenter training and bioimage.io's ``scale_range`` use; suits 12-bit data in uint16).

    Items are ``(image, mask)``: image float32 tensor ``(C, crop, crop)``, mask int64 tensor ``(crop, crop)``
    (0 = background, each other value one object).

    Raises
    ------
    InvalidInputError
        No labelled image in the set (or none by ``annotator``), ``crop`` or ``length`` not a positive integer,
        an unknown ``normalize``.
    """

    def __init__(self, folder: str | Path, *, crop: int = 256, annotator: str | None = None, length: int = 1000,
                 seed: int = 0, normalize: str = "dtype") -> None:
        for name, value in (("crop", crop), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = [
            (_scaled(image, normalize), mask) for _, image, mask in labelled_pairs(folder, annotator)]
        if not self.pairs:
            whose = f" by annotator {annotator!r}" if annotator is not None else ""
            raise InvalidInputError(f"no labelled images{whose} in {folder}")
        self.crop, self.length, self.seed = int(crop), int(length), int(seed)
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
        img, msk = image[y:y + c, x:x + c], mask[y:y + c, x:x + c].astype(np.int64)
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


def _scaled(image: np.ndarray, normalize: str) -> np.ndarray:
    """``(H, W, C)`` float32 image scaled as ``normalize`` says (see :class:`PulledDataset`)."""
    if image.ndim == 2:
        image = image[..., None]
    if normalize == "percentile":  # colabel's segmenter training's own normalisation (bioimage.io's scale_range)
        from colabel.services.training.segmenter_training import normalize_image

        return np.moveaxis(normalize_image(image), 0, -1)
    out = image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        out /= np.iinfo(image.dtype).max
    return out
