"""Interactive and automatic segmentation with one loaded SAM.

:class:`SamSegmenter` separates the expensive step from the cheap one, like micro-sam:
:meth:`~SamSegmenter.embed` runs the image encoder once per image (and tile), through an
:class:`~colabel.services.sam.embeddings.EmbeddingStore`; :meth:`~SamSegmenter.segment` decodes prompts
against a stored embedding in milliseconds; :meth:`~SamSegmenter.generate` runs segment_anything's
automatic mask generator on the stored embeddings.

Coordinates are image pixels ``[x, y]`` (``x`` = column, ``y`` = row, origin at the top-left corner);
masks are ``(H, W)`` bool; polygons are GeoJSON Features in the same coordinates. The mapping to the
model frame is :mod:`colabel.services.sam.transforms` (exact ``ResizeLongestSide`` and
``original_size`` / ``input_size`` per tile, so non-square images are right).

Large images (longest side > ``tile_size``) are split into overlapping tiles
(:mod:`colabel.services.sam.tiling`), one embedding each. A prompt is decoded on the tile that contains
it (:func:`~colabel.services.sam.tiling.route_prompt`); when the mask reaches the edge of the decoded
area somewhere other than the image border (:func:`~colabel.services.sam.tiling.frontier_tiles`), the
tile covering most of that frontier is decoded too, prompted with the original prompt's part inside
it plus the object found so far (an interior point of it, and its box grown by the overlap when the
prompt had no box), and the components that continue the object are merged (union). This repeats
across as many tiles as the object spans.

No ray or hypha_rpc imports; torch and segment_anything are imported lazily.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError

from .embeddings import EmbeddingStore, embedding_key
from .normalize import to_uint8_rgb
from .polygons import mask_to_features
from .tiling import Tile, frontier_tiles, interior_point, merge_into, route_prompt, tile_grid
from .transforms import box_to_model, points_to_model

__all__ = [
    "MAX_POINTS",
    "MAX_POINTS_PER_SIDE",
    "MAX_POINTS_PER_BATCH",
    "ImageEmbedding",
    "SegmentResult",
    "SamSegmenter",
    "validate_prompts",
    "check_point_count",
    "paint_labels",
    "default_embedding_dir",
    "mask_to_features",
]

logger = logging.getLogger(__name__)

#: Most point prompts in one ``segment`` call. Interactive SAM is a handful of clicks per object (the SAM
#: paper evaluates 1 to 9 points and trains with 11 rounds of prompts); 64 leaves ample room for scripted
#: prompts while bounding the decoder, whose token attention grows with the square of the number of points
#: (8000 points took 4 GiB and 20 s even on the tiny test model).
MAX_POINTS = 64

#: Largest ``points_per_side`` of :meth:`SamSegmenter.generate`: the grid has ``points_per_side ** 2`` prompts
#: per tile and the time grows with it (SAM's automatic mask generator uses 32; 64 is four times as dense).
MAX_POINTS_PER_SIDE = 64

#: Largest ``points_per_batch`` of :meth:`SamSegmenter.generate` (prompts decoded at once; memory grows with
#: it; segment_anything's default is 64).
MAX_POINTS_PER_BATCH = 256


def default_embedding_dir() -> Path:
    """``$COLABEL_EMBEDDING_DIR`` if set, else ``~/.cache/colabel/embeddings``."""
    env = os.environ.get("COLABEL_EMBEDDING_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "colabel" / "embeddings"


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """The encoder output of one image (one entry per tile).

    Attributes
    ----------
    model_id : str
    key : str
        The :class:`EmbeddingStore` key (sha256 of image bytes, shape, dtype, model and tiling).
    image_shape : (int, int)
        ``(H, W)`` of the full image.
    tiles : tuple of Tile
        One tile covering the image when it fits the model input.
    features : ndarray, shape (T, C, g, g), float32
        Encoder features per tile (``C = 256``, ``g = 64`` for the published models).
    input_sizes : ndarray, shape (T, 2), int64
        ``(h, w)`` of each tile after ``ResizeLongestSide`` (SAM's ``input_size``).
    """

    model_id: str
    key: str
    image_shape: tuple[int, int]
    tiles: tuple[Tile, ...]
    features: np.ndarray
    input_sizes: np.ndarray

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)


@dataclass(frozen=True, eq=False)
class SegmentResult:
    """The object a prompt selects.

    Attributes
    ----------
    mask : ndarray of bool, shape (H, W)
        In full-image pixels.
    score : float
        SAM's predicted IoU of the mask on the tile the prompt was routed to.
    polygons : list of dict
        GeoJSON Features (``Polygon`` / ``MultiPolygon``, holes kept) in image pixel ``[x, y]``; empty when
        the mask is empty.
    tiles_used : list of int
        Indices of the tiles decoded, the routed one first.
    low_res_logits : ndarray, shape (1, 4g, 4g), float32
        SAM's low-resolution logits on the routed tile: pass as ``mask_input`` to refine.
    """

    mask: np.ndarray
    score: float
    polygons: list[dict[str, Any]]
    tiles_used: list[int] = field(default_factory=list)
    low_res_logits: np.ndarray | None = None


def _finite_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, (str, bytes)):
        raise InvalidInputError(f"{name} must be numbers, got a string")
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be numbers: {exc}") from None
    if not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{name} must be finite numbers (no NaN or infinity)")
    return array


def validate_prompts(
    image_shape: tuple[int, int],
    *,
    points: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask_input: Any = None,
    low_res_size: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Check prompts against an image of ``(H, W)`` and return them as arrays.

    Returns
    -------
    points : ndarray (N, 2) float64 or None
    labels : ndarray (N,) int64 of 0 / 1 or None
    box : ndarray (4,) float64 or None
    mask_input : ndarray (1, S, S) float32 or None

    Raises
    ------
    InvalidInputError
        With one sentence: no prompt at all, empty point list, more than :data:`MAX_POINTS` points, wrong
        shapes, NaN or infinity, labels other than 0 / 1, labels without points or of another length,
        points or box outside ``[0, W] x [0, H]``, a box with ``x1 <= x0`` or ``y1 <= y0``, a mask_input
        of the wrong shape.
    """
    height, width = image_shape
    pts = labels = bx = mask = None
    if points is not None:
        pts = _finite_array(points, "points")
        if pts.size == 0:
            raise InvalidInputError("points must not be empty; pass None when there are no point prompts")
        if pts.ndim == 1 and pts.size == 2:
            pts = pts[None, :]
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise InvalidInputError(f"points must have shape (N, 2) of [x, y] pixels, got shape {pts.shape}")
        check_point_count(pts.shape[0])
        outside = (pts[:, 0] < 0) | (pts[:, 0] > width) | (pts[:, 1] < 0) | (pts[:, 1] > height)
        if outside.any():
            i = int(np.argmax(outside))
            raise InvalidInputError(
                f"point {i} at [x={pts[i, 0]:g}, y={pts[i, 1]:g}] lies outside the image of width {width} "
                f"and height {height}"
            )
        if point_labels is None:
            raise InvalidInputError("point_labels are required with points (1 = positive, 0 = negative)")
        lab = _finite_array(point_labels, "point_labels").reshape(-1) if np.ndim(point_labels) <= 1 else None
        if lab is None:
            raise InvalidInputError(f"point_labels must have shape (N,), got shape {np.shape(point_labels)}")
        if lab.shape[0] != pts.shape[0]:
            raise InvalidInputError(f"{pts.shape[0]} points but {lab.shape[0]} point_labels; give one label per point")
        if not np.all((lab == 0) | (lab == 1)):
            raise InvalidInputError("point_labels must be 1 (positive) or 0 (negative)")
        labels = lab.astype(np.int64)
    elif point_labels is not None and np.size(point_labels):
        raise InvalidInputError("point_labels were given without points")
    if box is not None:
        b = _finite_array(box, "box").reshape(-1) if np.size(box) == 4 else None
        if b is None:
            raise InvalidInputError(f"box must be 4 numbers [x0, y0, x1, y1], got shape {np.shape(box)}")
        if b[2] <= b[0] or b[3] <= b[1]:
            raise InvalidInputError(f"box [x0, y0, x1, y1] = {b.tolist()} must have x1 > x0 and y1 > y0")
        if b[0] < 0 or b[1] < 0 or b[2] > width or b[3] > height:
            raise InvalidInputError(
                f"box {b.tolist()} extends outside the image of width {width} and height {height}"
            )
        bx = b
    if pts is None and bx is None:
        raise InvalidInputError("give at least one prompt: points with point_labels, or a box")
    if mask_input is not None:
        m = _finite_array(mask_input, "mask_input").astype(np.float32)
        if m.ndim == 2:
            m = m[None]
        if low_res_size is not None and m.shape != (1, low_res_size, low_res_size):
            raise InvalidInputError(
                f"mask_input must have shape (1, {low_res_size}, {low_res_size}) (low_res_logits of an earlier "
                f"result), got {tuple(np.shape(mask_input))}"
            )
        mask = m
    return pts, labels, bx, mask


def check_point_count(n: int) -> None:
    """Raise :class:`InvalidInputError` when a prompt has more than :data:`MAX_POINTS` points (*n*)."""
    if n > MAX_POINTS:
        raise InvalidInputError(f"a prompt may have at most {MAX_POINTS} points, got {n}")


def keep_object(mask: np.ndarray, positives: np.ndarray | None) -> np.ndarray:
    """The connected parts of ``mask`` (H, W) bool that hold a positive point ``[x, y]``, else the largest part;
    holes of at most 1% of the object are filled. Returns a new bool array."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    keep: set[int] = set()
    if positives is not None and len(positives):
        h, w = mask.shape
        for x, y in np.asarray(positives, dtype=np.float64).reshape(-1, 2):
            r, c = min(int(y), h - 1), min(int(x), w - 1)
            if labels[r, c]:
                keep.add(int(labels[r, c]))
    if not keep:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = {int(sizes.argmax())}
    out = np.isin(labels, list(keep))
    holes, n_holes = ndimage.label(~out)
    if n_holes > 1:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = np.flatnonzero(sizes <= max(1, out.sum() // 100))
        out |= np.isin(holes, np.setdiff1d(small, border)) & (holes > 0)
    return out


def paint_labels(shape: tuple[int, int], masks: list[tuple[float, tuple[int, int], np.ndarray]]) -> np.ndarray:
    """A label image from scored masks; where masks overlap, the higher score wins.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the label image.
    masks : list of (score, (x0, y0), mask)
        ``mask`` is a bool array placed with its top-left pixel at column ``x0``, row ``y0``.

    Returns
    -------
    labels : ndarray (H, W) uint32
        0 background; objects 1..K numbered by decreasing score (ties: input order), without gaps: a mask
        wholly covered by higher-scoring ones gets no label.
    """
    from skimage.segmentation import relabel_sequential

    labels = np.zeros(shape, dtype=np.uint32)
    order = sorted(range(len(masks)), key=lambda i: (-masks[i][0], i))
    for rank in range(len(order) - 1, -1, -1):  # lowest score first, so higher scores overwrite
        _, (x0, y0), mask = masks[order[rank]]
        mask = np.asarray(mask, dtype=bool)
        view = labels[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        view[mask[: view.shape[0], : view.shape[1]]] = rank + 1
    if masks:
        labels = relabel_sequential(labels)[0].astype(np.uint32)
    return labels


def _remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment_anything.utils.amg.remove_small_regions with scikit-image instead of OpenCV (8-connected)."""
    from skimage.measure import label

    if mode not in ("holes", "islands"):
        raise InvalidInputError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = np.logical_xor(correct_holes, mask)
    regions = label(working, connectivity=2)
    sizes = np.bincount(regions.ravel())[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(len(sizes) + 1) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def _postprocess_small_regions(mask_data, min_area: int, nms_thresh: float):
    """SamAutomaticMaskGenerator.postprocess_small_regions without OpenCV (same logic)."""
    import torch
    from segment_anything.utils.amg import batched_mask_to_box, mask_to_rle_pytorch, rle_to_mask
    from torchvision.ops.boxes import batched_nms  # the real one, or colabel's stand-in

    if len(mask_data["rles"]) == 0:
        return mask_data
    new_masks, scores = [], []
    for rle in mask_data["rles"]:
        mask = rle_to_mask(rle)
        mask, changed = _remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = _remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        new_masks.append(torch.as_tensor(mask).unsqueeze(0))
        scores.append(float(unchanged))
    masks = torch.cat(new_masks, dim=0)
    boxes = batched_mask_to_box(masks)
    keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), iou_threshold=nms_thresh)
    for i in keep:
        if scores[i] == 0.0:
            mask_data["rles"][i] = mask_to_rle_pytorch(masks[i].unsqueeze(0))[0]
            mask_data["boxes"][i] = boxes[i]
    mask_data.filter(keep)
    return mask_data


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> int:
    """*value* as an int in ``lo..hi`` (no upper bound when *hi* is None), else InvalidInputError."""
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integer or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise InvalidInputError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def ambiguous_prompt(points: Any, box: Any) -> bool:
    """SAM's rule for when one prompt may mean several objects, as its exported ONNX decoder applies it.

    The decoder counts prompt points with the padding point (added when there is no box) or the two box
    corners, and picks the best of its three masks when that count is below 2.5: one point without a box,
    or a box alone. ``points`` is (N, 2) array-like, one ``[x, y]``, or None; ``box`` 4 numbers or None.
    Malformed points count as one (:func:`validate_prompts` refuses them afterwards).
    """
    if points is None:
        n = 0
    else:
        try:
            shape = np.shape(points)
        except ValueError:  # ragged
            shape = ()
        n = int(shape[0]) if len(shape) >= 2 else 1  # a flat [x, y] is one point, as validate_prompts reads it
    return n + (2 if box is not None else 1) < 2.5


class SamSegmenter:
    """One loaded SAM: embeddings (cached), prompt decoding with tiling, automatic masks.

    Parameters
    ----------
    model_id : str
        A published id (``sam_vit_b``, ``sam_vit_b_lm``, ...) or one configured in *checkpoints*.
    checkpoints : mapping, optional
        Local checkpoint files (see :func:`colabel.services.sam.registry.resolve`).
    weights_dir : path-like, optional
        Weights cache (default ``$COLABEL_CACHE_DIR`` or ``~/.cache/colabel/weights``).
    store : EmbeddingStore, optional
        Where embeddings are kept; by default an :class:`EmbeddingStore` in *embedding_dir*.
    embedding_dir : path-like, optional
        Default ``$COLABEL_EMBEDDING_DIR`` or ``~/.cache/colabel/embeddings``.
    device : str, optional
        ``"cpu"`` / ``"cuda"``; None picks CUDA when available.
    tile_size : int, optional
        Longest side above which images are tiled; default the model's input size (1024 for the published
        models, the ``image_size`` of a tiny test model).
    overlap : int, default 64
        Minimum overlap of neighbouring tiles in pixels.
    progress : bool, default True
        Show a progress bar while downloading weights.

    Notes
    -----
    Torch calls run under a per-instance lock, so one segmenter may be shared by threads (calls are
    serialised); for parallelism use one segmenter per worker. :meth:`generate` takes the lock once per
    decoder batch, not for the whole call, so prompts from other threads are decoded between its batches.

    Examples
    --------
    >>> seg = SamSegmenter("sam_vit_b_lm")  # doctest: +SKIP
    >>> emb = seg.embed(image)  # doctest: +SKIP
    >>> result = seg.segment(emb, points=[[120.5, 80.5]], point_labels=[1])  # doctest: +SKIP
    >>> result.mask.shape == image.shape[:2], result.polygons[0]["geometry"]["type"]  # doctest: +SKIP
    (True, 'Polygon')
    """

    def __init__(
        self,
        model_id: str,
        *,
        checkpoints: Mapping[str, Any] | None = None,
        weights_dir: str | os.PathLike | None = None,
        store: EmbeddingStore | None = None,
        embedding_dir: str | os.PathLike | None = None,
        device: str | None = None,
        tile_size: int | None = None,
        overlap: int = 64,
        progress: bool = True,
    ) -> None:
        from .registry import checkpoint_path, load_sam

        sam, spec = load_sam(
            model_id, checkpoints=checkpoints, cache_dir=weights_dir, device=device, progress=progress
        )
        if spec.checksum:
            fingerprint = spec.checksum
        else:
            path = checkpoint_path(spec, cache_dir=weights_dir, progress=False)
            st = path.stat()
            fingerprint = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        self._setup(sam, model_id=model_id, spec=spec, fingerprint=fingerprint, store=store,
                    embedding_dir=embedding_dir, tile_size=tile_size, overlap=overlap)

    @classmethod
    def from_sam(
        cls,
        sam,
        *,
        model_id: str,
        fingerprint: str | None = None,
        store: EmbeddingStore | None = None,
        embedding_dir: str | os.PathLike | None = None,
        tile_size: int | None = None,
        overlap: int = 64,
    ) -> SamSegmenter:
        """Wrap an already built SAM (e.g. from :func:`~colabel.services.sam.registry.build_sam`).

        *fingerprint* (default: ``model_id`` and the object's id) is part of the embedding keys, so
        embeddings of two different weight sets never mix.
        """
        self = cls.__new__(cls)
        self._setup(sam, model_id=model_id, spec=None, fingerprint=fingerprint or f"{model_id}:{id(sam)}",
                    store=store, embedding_dir=embedding_dir, tile_size=tile_size, overlap=overlap)
        return self

    def _setup(self, sam, *, model_id, spec, fingerprint, store, embedding_dir, tile_size, overlap) -> None:
        from colabel.services.torchvision_compat import install

        install()
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model_id = model_id
        self.spec = spec
        self.sam = sam
        self.fingerprint = fingerprint
        self.long_side = int(sam.image_encoder.img_size)
        self.embedding_grid = int(sam.prompt_encoder.image_embedding_size[0])
        self.low_res_size = 4 * self.embedding_grid
        self.mask_threshold = float(sam.mask_threshold)
        self.tile_size = int(tile_size) if tile_size is not None else self.long_side
        if overlap < 0 or overlap >= self.tile_size:
            raise InvalidInputError(f"overlap must be in 0..{self.tile_size - 1}, got {overlap}")
        self.overlap = int(overlap)
        self.store = store if store is not None else EmbeddingStore(embedding_dir or default_embedding_dir())
        self._transform = ResizeLongestSide(self.long_side)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return str(next(self.sam.parameters()).device)

    def info(self) -> dict[str, Any]:
        """Model id, architecture summary, device, tiling."""
        cfg = getattr(self.sam, "colabel_config", None)
        return {
            "model_id": self.model_id,
            "device": self.device,
            "image_size": self.long_side,
            "embedding_shape": [int(self.sam.prompt_encoder.embed_dim), self.embedding_grid, self.embedding_grid],
            "tile_size": self.tile_size,
            "overlap": self.overlap,
            "config": cfg.to_dict() if cfg is not None else None,
        }

    def _encode(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Features ``(C, g, g)`` float32 and SAM ``input_size`` of one uint8 RGB tile."""
        import torch

        input_image = self._transform.apply_image(rgb)
        with self._lock, torch.no_grad():
            tensor = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
            input_size = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            features = self.sam.image_encoder(self.sam.preprocess(tensor))
        return features[0].float().cpu().numpy(), input_size

    def embed(self, image: np.ndarray, *, tiling: bool = True) -> ImageEmbedding:
        """Compute (or fetch from the store) the embedding of *image*.

        Parameters
        ----------
        image : ndarray, shape (H, W) or (H, W, C), any dtype
            Normalised with :func:`colabel.services.sam.normalize.to_uint8_rgb` (grey -> RGB; 16-bit
            and float by 0.5-99.5 percentiles; RGBA drops alpha; 2 or 5-16 channels are averaged; more than
            16 channels last are refused: a channels-first stack).
        tiling : bool, default True
            False embeds the whole image resized to the model input, whatever its size (as BioImage.IO
            Colab does).

        Returns
        -------
        ImageEmbedding
        """
        array = np.asarray(image)
        rgb = to_uint8_rgb(array)
        height, width = rgb.shape[:2]
        tile_size = self.tile_size if tiling else max(height, width, 16)
        tiles = tile_grid((height, width), tile_size=tile_size, overlap=min(self.overlap, tile_size - 1))
        key = embedding_key(
            array, self.model_id,
            extra={"weights": self.fingerprint, "long_side": self.long_side,
                   "tiles": [t.box for t in tiles]},
        )

        def compute() -> dict[str, np.ndarray]:
            features, sizes = [], []
            for tile in tiles:
                f, size = self._encode(rgb[tile.slices()])
                features.append(f)
                sizes.append(size)
            return {
                "features": np.stack(features).astype(np.float32),
                "input_sizes": np.asarray(sizes, dtype=np.int64),
                "tile_boxes": np.asarray([t.box for t in tiles], dtype=np.int64),
                "image_shape": np.asarray([height, width], dtype=np.int64),
                **self._origin(),
            }

        # a file of an older format (no model recorded) is computed again and replaced
        arrays = self.store.get_or_compute(key, compute, accept=lambda stored: self._made_here(stored) is True)
        return ImageEmbedding(
            model_id=self.model_id,
            key=key,
            image_shape=(height, width),
            tiles=tiles,
            features=arrays["features"],
            input_sizes=arrays["input_sizes"],
        )

    def _origin(self) -> dict[str, np.ndarray]:
        """What an embedding records of the model that made it: ``model_id`` and ``fingerprint`` (0-d str)."""
        return {"model_id": np.asarray(str(self.model_id)), "fingerprint": np.asarray(str(self.fingerprint))}

    def _made_here(self, arrays: Mapping[str, np.ndarray]) -> bool | None:
        """True when *arrays* were made by this model and weights, False when by another, None when they do not
        say (an embedding stored before the model was recorded)."""
        if "model_id" not in arrays or "fingerprint" not in arrays:
            return None
        return str(arrays["model_id"]) == str(self.model_id) and str(arrays["fingerprint"]) == str(self.fingerprint)

    def load_embedding(self, key: str) -> ImageEmbedding | None:
        """The embedding stored under ``key`` (by this or any replica sharing the store), or None.

        Lets a prompt carry only the embedding's key instead of the image: tiles are rebuilt from the stored
        tile boxes and image shape. An embedding stored without its model (an older format) counts as
        missing: :meth:`embed` computes it again.

        Raises
        ------
        NotFoundError
            The embedding was made by another model (or other weights under the same id): decoding it with
            this model's decoder would give silently wrong masks.
        """
        arrays = self.store.get(key)
        if arrays is None:
            return None
        made_here = self._made_here(arrays)
        if made_here is None:
            return None
        if not made_here:
            other = str(arrays["model_id"])
            what = f"model {other!r}" if other != self.model_id else f"other weights of model {other!r}"
            raise NotFoundError(
                f"embedding {key[:16]}... was made by {what}, not by model {self.model_id!r}; call embed with "
                f"the image and model {self.model_id!r}"
            )
        height, width = (int(v) for v in arrays["image_shape"])
        boxes = [tuple(int(v) for v in box) for box in arrays["tile_boxes"]]
        for tile_size in (self.tile_size, max(height, width, 16)):
            tiles = tile_grid((height, width), tile_size=tile_size, overlap=min(self.overlap, tile_size - 1))
            if [t.box for t in tiles] == boxes:
                return ImageEmbedding(model_id=self.model_id, key=key, image_shape=(height, width), tiles=tiles,
                                      features=arrays["features"], input_sizes=arrays["input_sizes"])
        return None

    # ------------------------------------------------------------------------------------------------

    def decode_tile(
        self,
        embedding: ImageEmbedding,
        tile_index: int,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Decode prompts (in *tile* pixel coordinates) on one tile.

        Returns
        -------
        mask : ndarray of bool, shape tile.shape
        score : float
        low_res_logits : ndarray (1, 4g, 4g) float32
        """
        import torch

        tile = embedding.tiles[tile_index]
        original_size = tile.shape
        input_size = tuple(int(v) for v in embedding.input_sizes[tile_index])
        device = self.device
        coords_t = labels_t = box_t = mask_t = None
        if points is not None and len(points):
            coords = points_to_model(points, original_size, self.long_side)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=device)[None]
        if box is not None:
            box_t = torch.as_tensor(box_to_model(box, original_size, self.long_side), dtype=torch.float,
                                    device=device)[None]
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=device)[None]
        with self._lock, torch.no_grad():
            features = torch.as_tensor(embedding.features[tile_index:tile_index + 1], device=device)
            sparse, dense = self.sam.prompt_encoder(
                points=(coords_t, labels_t) if coords_t is not None else None, boxes=box_t, masks=mask_t
            )
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=features,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            best = int(torch.argmax(iou[0])) if multimask else 0
            low_res = low_res[:, best:best + 1]
            masks = self.sam.postprocess_masks(low_res, input_size, original_size)
            mask = (masks[0, 0] > self.sam.mask_threshold).cpu().numpy()
            score = float(iou[0, best])
            logits = low_res[0].float().cpu().numpy()
        return mask, score, logits

    def segment(
        self,
        embedding: ImageEmbedding | np.ndarray,
        *,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask: bool = False,
        max_tiles: int | None = None,
        properties: dict[str, Any] | None = None,
        single_object: bool = False,
    ) -> SegmentResult:
        """Segment the object that prompts select.

        Parameters
        ----------
        embedding : ImageEmbedding or ndarray
            From :meth:`embed` (an image array is embedded first).
        points : array-like, shape (N, 2), optional
            ``[x, y]`` image pixels (continuous, ``0 <= x <= W``, ``0 <= y <= H``).
        point_labels : array-like, shape (N,), optional
            1 positive, 0 negative; required with *points*.
        box : array-like, shape (4,), optional
            ``[x0, y0, x1, y1]`` image pixels, ``x1 > x0``, ``y1 > y0``.
        mask_input : array-like, shape (1, 4g, 4g), optional
            ``low_res_logits`` of an earlier result on the same routed tile, to refine it.
        multimask : bool, default False
            Let SAM propose three masks and keep the best-scoring one (helps single ambiguous clicks).
        max_tiles : int, optional
            Most tiles to decode when the object spans tiles (default: all).
        properties : dict, optional
            Copied into the polygon Features' properties.
        single_object : bool, default False
            Keep only the object the prompts point at (see :func:`keep_object`): what an annotator's click
            should turn into, one editable outline without stray specks.

        Returns
        -------
        SegmentResult

        Raises
        ------
        InvalidInputError
            Bad prompts (see :func:`validate_prompts`).
        """
        if not isinstance(embedding, ImageEmbedding):
            embedding = self.embed(embedding)
        if not isinstance(multimask, (bool, np.bool_)):
            raise InvalidInputError(f"multimask must be true or false, got {multimask!r}")
        pts, labels, bx, mask_in = validate_prompts(
            embedding.image_shape, points=points, point_labels=point_labels, box=box, mask_input=mask_input,
            low_res_size=self.low_res_size,
        )
        tiles = embedding.tiles
        height, width = embedding.image_shape
        first = route_prompt(tiles, embedding.image_shape, points=pts, labels=labels, box=bx)
        canvas = np.zeros((height, width), dtype=bool)
        positives = pts[labels == 1] if pts is not None else np.zeros((0, 2))

        def prompt_for(tile: Tile, extra_point: np.ndarray | None, hint_box: np.ndarray | None):
            x0, y0, x1, y1 = tile.box
            offset = tile.offset
            p = lab = None
            if pts is not None:
                inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
                if inside.any():
                    p, lab = pts[inside] - offset, labels[inside]
            if extra_point is not None:
                p = extra_point[None] - offset if p is None else np.vstack([p, extra_point[None] - offset])
                lab = np.array([1]) if lab is None else np.append(lab, 1)
            b = None
            source_box = bx if bx is not None else hint_box
            if source_box is not None:
                clipped = np.array([max(source_box[0], x0), max(source_box[1], y0),
                                    min(source_box[2], x1), min(source_box[3], y1)])
                if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
                    b = clipped - np.tile(offset, 2)
            return p, lab, b

        p, lab, b = prompt_for(tiles[first], None, None)
        if p is None and b is None:  # the prompt lies wholly outside the routed tile (cannot happen by routing)
            raise InvalidInputError("the prompt does not overlap any tile of the image")
        tile_mask, score, logits = self.decode_tile(
            embedding, first, points=p, labels=lab, box=b, mask_input=mask_in, multimask=multimask
        )
        canvas = merge_into(canvas, tile_mask, tiles[first])
        used = [first]
        if len(tiles) > 1:
            limit = len(tiles) if max_tiles is None else max(1, int(max_tiles))
            while len(used) < limit:
                candidates = frontier_tiles(tiles, canvas, used)
                # positive points outside every decoded tile seed the tile whose core holds them
                for x, y in positives:
                    if not any(tiles[i].box[0] <= x <= tiles[i].box[2] and tiles[i].box[1] <= y <= tiles[i].box[3]
                               for i in used):
                        candidates += [t.index for t in tiles
                                       if t.index not in used and t.core_contains(float(x), float(y), (height, width))]
                if not candidates:
                    break
                index = candidates[0]
                tile = tiles[index]
                used.append(index)
                rows, cols = tile.slices()
                region = canvas[rows, cols]
                anchor = interior_point(region)
                anchor = anchor + tile.offset if anchor is not None else None
                hint = None
                if region.any() and bx is None:
                    r, c = np.nonzero(region)
                    grow = self.overlap
                    hint = np.array([c.min() - grow, r.min() - grow, c.max() + 1 + grow, r.max() + 1 + grow],
                                    dtype=np.float64) + np.tile(tile.offset, 2)
                p, lab, b = prompt_for(tile, anchor, hint)
                if p is None and b is None:
                    continue
                tile_mask, _, _ = self.decode_tile(embedding, index, points=p, labels=lab, box=b)
                canvas = merge_into(canvas, tile_mask, tile, seeds=positives)
        if single_object:
            canvas = keep_object(canvas, positives)
        polygons = mask_to_features(canvas, properties=properties)
        return SegmentResult(mask=canvas, score=score, polygons=polygons, tiles_used=used, low_res_logits=logits)

    # ------------------------------------------------------------------------------------------------

    def generate(
        self,
        image: np.ndarray,
        *,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        min_mask_region_area: int = 0,
        points_per_batch: int = 64,
        tiling: bool = True,
    ) -> np.ndarray:
        """Segment everything: segment_anything's ``SamAutomaticMaskGenerator`` on the stored embeddings.

        Parameters
        ----------
        image : ndarray, shape (H, W) or (H, W, C)
        points_per_side : int, default 32
            Grid of point prompts per tile, 1 to :data:`MAX_POINTS_PER_SIDE` (64).
        pred_iou_thresh, stability_score_thresh : float
            SAM's quality filters (defaults as segment_anything / BioImage.IO Colab).
        min_mask_region_area : int, default 0
            Remove islands and fill holes smaller than this (pixels), as SAM does, without OpenCV.
        points_per_batch : int, default 64
            Prompts decoded at once, 1 to :data:`MAX_POINTS_PER_BATCH` (256). The segmenter's lock is held
            for one batch at a time, so :meth:`segment` calls from other threads are served between batches.
        tiling : bool, default True
            Run per tile for large images (masks are kept by the tile whose core holds their box centre).

        Returns
        -------
        labels : ndarray, shape (H, W), uint32
            0 background, 1..K objects numbered by decreasing predicted IoU; where masks overlap, the
            higher-scoring one wins.
        """
        import torch

        from colabel.services.torchvision_compat import install

        _check_int("points_per_side", points_per_side, 1, MAX_POINTS_PER_SIDE)
        _check_int("points_per_batch", points_per_batch, 1, MAX_POINTS_PER_BATCH)
        _check_int("min_mask_region_area", min_mask_region_area, 0, None)
        for name, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh)):
            if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
                raise InvalidInputError(f"{name} must be a finite number, got {value!r}")

        embedding = self.embed(image, tiling=tiling)
        rgb = to_uint8_rgb(np.asarray(image))
        install()
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        lock = self._lock

        class _PresetPredictor(SamPredictor):
            """A SamPredictor whose set_image uses a stored embedding instead of running the encoder, and whose
            decoder batches take the segmenter's lock one at a time (interactive calls run between them)."""

            preset: tuple[Any, tuple[int, int]]

            def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
                self.reset_image()
                self.features, self.input_size = self.preset
                self.original_size = tuple(image.shape[:2])
                self.is_image_set = True

            def predict_torch(self, *args: Any, **kwargs: Any):
                with lock:
                    return super().predict_torch(*args, **kwargs)

        class _Generator(SamAutomaticMaskGenerator):
            postprocess_small_regions = staticmethod(_postprocess_small_regions)

        records: list[tuple[float, int, dict[str, Any]]] = []
        height, width = embedding.image_shape
        for tile in embedding.tiles:
            generator = _Generator(
                self.sam,
                points_per_side=int(points_per_side),
                points_per_batch=int(points_per_batch),
                pred_iou_thresh=float(pred_iou_thresh),
                stability_score_thresh=float(stability_score_thresh),
                min_mask_region_area=0,  # set below: the constructor would import cv2
                output_mode="binary_mask",
            )
            generator.min_mask_region_area = int(min_mask_region_area)
            predictor = _PresetPredictor(self.sam)
            predictor.preset = (
                torch.as_tensor(embedding.features[tile.index:tile.index + 1], device=self.device),
                tuple(int(v) for v in embedding.input_sizes[tile.index]),
            )
            generator.predictor = predictor
            annotations = generator.generate(rgb[tile.slices()])  # the lock is taken per decoder batch
            for ann in annotations:
                bx, by, bw, bh = ann["bbox"]
                cx, cy = tile.box[0] + bx + bw / 2, tile.box[1] + by + bh / 2
                if len(embedding.tiles) > 1 and not tile.core_contains(cx, cy, (height, width)):
                    continue
                records.append((float(ann["predicted_iou"]), tile.index, ann))
        return paint_labels(
            (height, width),
            [(score, embedding.tiles[index].box[:2], ann["segmentation"]) for score, index, ann in records],
        )
