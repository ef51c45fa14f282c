"""Pure torch / PIL stand-ins for the four torchvision functions that ``segment_anything`` imports.

``segment_anything`` imports torchvision for exactly four names::

    segment_anything/automatic_mask_generator.py: from torchvision.ops.boxes import batched_nms, box_area
    segment_anything/utils/transforms.py:         from torchvision.transforms.functional import resize, to_pil_image

On a machine where CPU-only torch sits next to a CUDA torchvision wheel, ``import torchvision`` fails
(``operator torchvision::nms does not exist``) and so would ``import segment_anything``. :func:`install`
registers small stand-in modules in :data:`sys.modules` **only when** ``import torchvision`` fails, so a
working torchvision is always preferred. The functions here follow torchvision's semantics:

* :func:`box_area` -- ``(x1 - x0) * (y1 - y0)`` per ``xyxy`` box, integer boxes upcast like torchvision.
* :func:`nms` / :func:`batched_nms` -- greedy non-maximum suppression: boxes are visited in order of
  decreasing score (a stable sort, so equal scores keep their input order), a box is dropped when its
  IoU with an already kept box *of the same category* is strictly greater than ``iou_threshold``
  (an IoU of NaN, from two empty boxes, never suppresses). Returns int64 indices of the kept boxes in
  decreasing score order.
* :func:`resize` -- PIL images are resized with PIL (bilinear by default, which antialiases), exactly as
  torchvision's PIL backend does; tensors use :func:`torch.nn.functional.interpolate`.
* :func:`to_pil_image` -- ``(H, W)``, ``(H, W, C)`` numpy arrays or ``(C, H, W)`` / ``(H, W)`` tensors to
  a PIL image with torchvision's mode rules (float data other than mode ``"F"`` is scaled by 255).

No torch import happens at module import time; the functions import it when called.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "box_area",
    "nms",
    "batched_nms",
    "resize",
    "to_pil_image",
    "install",
    "is_stand_in",
    "STAND_IN_MODULES",
]

#: The module names :func:`install` registers (each ``segment_anything`` import path and its parents).
STAND_IN_MODULES = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.boxes",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)

_MARKER = "__colabel_stand_in__"


# --------------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------------


def _upcast(t):
    """torchvision's ``_upcast``: float16 -> float32, small ints -> int32/int64, else unchanged."""
    import torch

    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes):
    """Area of ``xyxy`` boxes.

    Parameters
    ----------
    boxes : torch.Tensor, shape (N, 4)
        ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``.

    Returns
    -------
    area : torch.Tensor, shape (N,)
        ``(x1 - x0) * (y1 - y0)``; float16 is computed in float32, small integer types in int32.
    """
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _check_boxes(boxes, scores, idxs=None) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if idxs is not None and (idxs.ndim != 1 or idxs.shape[0] != boxes.shape[0]):
        raise ValueError(f"idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on numpy arrays; boxes suppress only boxes of the same group."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    areas = (x1 - x0) * (y1 - y0)
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        while order.size:
            i = order[0]
            keep.append(int(i))
            rest = order[1:]
            if rest.size == 0:
                break
            w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
            h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            suppressed = (iou > iou_threshold) & (groups[rest] == groups[i])  # NaN > t is False
            order = rest[~suppressed]
    return np.asarray(keep, dtype=np.int64)


def nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression of ``xyxy`` boxes (torchvision.ops.nms semantics).

    Parameters
    ----------
    boxes : torch.Tensor, shape (N, 4)
    scores : torch.Tensor, shape (N,)
    iou_threshold : float
        Boxes whose IoU with a kept, higher-scoring box is strictly greater than this are dropped.

    Returns
    -------
    keep : torch.Tensor, shape (K,), int64
        Indices of kept boxes, by decreasing score (ties in input order).
    """
    import torch

    return batched_nms(boxes, scores, torch.zeros(boxes.shape[0], dtype=torch.int64), iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """Non-maximum suppression done independently per category (torchvision.ops.batched_nms semantics).

    Parameters
    ----------
    boxes : torch.Tensor, shape (N, 4)
        ``xyxy`` boxes, any real dtype.
    scores : torch.Tensor, shape (N,)
    idxs : torch.Tensor, shape (N,)
        Category of each box; boxes of different categories never suppress each other.
    iou_threshold : float

    Returns
    -------
    keep : torch.Tensor, shape (K,), int64, on the device of *boxes*
        Indices of kept boxes by decreasing score; equal scores keep their input order.

    Examples
    --------
    >>> import torch
    >>> b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    >>> batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3), 0.5).tolist()
    [0, 2]
    """
    import torch

    _check_boxes(boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep = _greedy_nms(
        boxes.detach().to("cpu", torch.float64).numpy(),
        scores.detach().to("cpu", torch.float64).numpy(),
        idxs.detach().to("cpu").numpy(),
        float(iou_threshold),
    )
    return torch.from_numpy(keep).to(boxes.device)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def _pil_resample(interpolation: Any):
    from PIL import Image

    if interpolation is None:
        return Image.Resampling.BILINEAR
    if isinstance(interpolation, int):  # a PIL constant
        return Image.Resampling(interpolation)
    name = getattr(interpolation, "value", interpolation)  # torchvision InterpolationMode or its value
    table = {
        "nearest": Image.Resampling.NEAREST,
        "nearest-exact": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
        "lanczos": Image.Resampling.LANCZOS,
    }
    try:
        return table[str(name).lower()]
    except KeyError:
        raise ValueError(f"unsupported interpolation {interpolation!r}") from None


def _output_size(h: int, w: int, size: int | Sequence[int], max_size: int | None) -> tuple[int, int]:
    """torchvision's rule: a sequence is (h, w); an int sets the *smaller* edge, keeping the aspect ratio."""
    if isinstance(size, (list, tuple)):
        if len(size) == 2:
            return int(size[0]), int(size[1])
        if len(size) != 1:
            raise ValueError(f"size must be an int or a sequence of 1 or 2 ints, got {size!r}")
        size = size[0]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size), int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), int(max_size)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def resize(img, size, interpolation=None, max_size: int | None = None, antialias: bool | None = True):
    """Resize a PIL image or an image tensor (torchvision.transforms.functional.resize semantics).

    Parameters
    ----------
    img : PIL.Image.Image or torch.Tensor, shape (..., H, W)
    size : int or sequence of 2 int
        ``(h, w)``, or the length of the smaller edge when an int.
    interpolation : InterpolationMode, str or PIL constant, optional
        Bilinear by default.
    max_size : int, optional
        Cap of the longer edge when *size* is an int.
    antialias : bool, default True
        Tensors only (PIL always antialiases when downscaling).

    Returns
    -------
    PIL.Image.Image or torch.Tensor
        The same kind as *img*.
    """
    from PIL import Image

    if isinstance(img, Image.Image):
        w, h = img.size
        new_h, new_w = _output_size(h, w, size, max_size)
        if (new_h, new_w) == (h, w):
            return img
        return img.resize((new_w, new_h), _pil_resample(interpolation))

    import torch
    import torch.nn.functional as F

    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img should be a PIL Image or a Tensor, got {type(img).__name__}")
    h, w = img.shape[-2:]
    new_h, new_w = _output_size(int(h), int(w), size, max_size)
    if (new_h, new_w) == (h, w):
        return img
    mode = str(getattr(interpolation, "value", interpolation or "bilinear")).lower()
    shape = img.shape
    x = img.reshape(-1, 1, int(h), int(w)) if img.ndim != 4 else img
    dtype = x.dtype
    x = x.float() if not x.is_floating_point() else x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["antialias"] = bool(antialias)
    out = F.interpolate(x, size=(new_h, new_w), mode=mode, **kwargs)
    if not dtype.is_floating_point:
        out = out.round_().clamp_(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    return out.reshape(*shape[:-2], new_h, new_w) if img.ndim != 4 else out


def to_pil_image(pic, mode: str | None = None):
    """Convert a numpy array or tensor to a PIL image (torchvision.transforms.functional.to_pil_image).

    Parameters
    ----------
    pic : numpy.ndarray, shape (H, W) or (H, W, C); or torch.Tensor, shape (H, W) or (C, H, W)
        ``C <= 4``. Floating-point data is multiplied by 255 and cast to uint8 unless *mode* is ``"F"``.
    mode : str, optional
        PIL mode; inferred as torchvision does (``L``, ``I;16``, ``I``, ``F``, ``LA``, ``RGB``, ``RGBA``).

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image

    if not isinstance(pic, np.ndarray):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency of segment_anything
            torch = None
        if torch is not None and isinstance(pic, torch.Tensor):
            if pic.ndim == 3:
                pic = pic.permute(1, 2, 0)
            pic = pic.detach().cpu().numpy()
        else:
            raise TypeError(f"pic should be a Tensor or ndarray, got {type(pic).__name__}")
    if pic.ndim == 2:
        pic = pic[:, :, None]
    if pic.ndim != 3:
        raise ValueError(f"pic should be 2 or 3 dimensional, got {pic.ndim} dimensions")
    if pic.shape[-1] > 4:
        raise ValueError(f"pic should not have more than 4 channels, got {pic.shape[-1]}")
    npimg = pic
    if np.issubdtype(npimg.dtype, np.floating) and mode != "F":
        npimg = (npimg * 255).astype(np.uint8)

    channels = npimg.shape[2]
    if channels == 1:
        npimg = npimg[:, :, 0]
        expected = {np.dtype(np.uint8): "L", np.dtype(np.int16): "I;16", np.dtype(np.uint16): "I;16",
                    np.dtype(np.int32): "I", np.dtype(np.float32): "F"}.get(npimg.dtype)
        if mode is not None and mode != expected:
            raise ValueError(f"incorrect mode {mode!r} supplied for input type {npimg.dtype}")
        mode = expected
    elif channels == 2:
        if mode is not None and mode != "LA":
            raise ValueError(f"only mode 'LA' is supported for 2 channel images, got {mode!r}")
        if mode is None and npimg.dtype == np.uint8:
            mode = "LA"
    elif channels == 4:
        if mode is not None and mode not in ("RGBA", "CMYK", "RGBX"):
            raise ValueError(f"only modes RGBA, CMYK, RGBX are supported for 4 channel images, got {mode!r}")
        if mode is None and npimg.dtype == np.uint8:
            mode = "RGBA"
    else:
        if mode is not None and mode not in ("RGB", "YCbCr", "HSV"):
            raise ValueError(f"only modes RGB, YCbCr, HSV are supported for 3 channel images, got {mode!r}")
        if mode is None and npimg.dtype == np.uint8:
            mode = "RGB"
    if mode is None:
        raise TypeError(f"input type {npimg.dtype} is not supported")
    npimg = np.ascontiguousarray(npimg)
    if mode in ("L", "LA", "RGB", "RGBA", "F", "I"):
        image = Image.fromarray(npimg)  # PIL infers the same mode for these dtypes and shapes
        return image if image.mode == mode else image.convert(mode)
    if mode == "I;16":
        return Image.fromarray(npimg.astype(np.uint16))
    # modes PIL cannot infer from the array (CMYK, RGBX, YCbCr, HSV): build from the raw bytes
    return Image.frombuffer(mode, (npimg.shape[1], npimg.shape[0]), npimg.astype(np.uint8).tobytes(), "raw", mode, 0, 1)


# --------------------------------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------------------------------


def is_stand_in(module: types.ModuleType | None = None) -> bool:
    """True when *module* (default: ``sys.modules["torchvision"]``) is one of colabel's stand-ins."""
    module = sys.modules.get("torchvision") if module is None else module
    return bool(getattr(module, _MARKER, False))


def _real_torchvision_importable() -> bool:
    """Try the real ``import torchvision``; on failure remove the partial modules it left behind."""
    if "torchvision" in sys.modules:
        return True  # a real one, already imported (stand-ins are handled by the caller)
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from a CUDA wheel next to CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install() -> bool:
    """Make ``import segment_anything`` work when torchvision cannot be imported.

    When ``import torchvision`` succeeds this does nothing. Otherwise it registers the modules in
    :data:`STAND_IN_MODULES` in :data:`sys.modules`, exposing :func:`batched_nms`, :func:`nms` and
    :func:`box_area` (``torchvision.ops`` and ``torchvision.ops.boxes``) and :func:`resize` and
    :func:`to_pil_image` (``torchvision.transforms.functional``). Safe to call repeatedly and from
    several threads (the second call finds the modules in place).

    Returns
    -------
    installed : bool
        True when the stand-ins are in use (installed now or earlier), False when the real torchvision
        is used.
    """
    current = sys.modules.get("torchvision")
    if current is not None:
        return is_stand_in(current)
    if _real_torchvision_importable():
        return False

    modules = {name: types.ModuleType(name, f"colabel stand-in for {name} ({__name__})") for name in STAND_IN_MODULES}
    for module in modules.values():
        setattr(module, _MARKER, True)
        module.__path__ = []  # make each one a package so submodule imports resolve through sys.modules
    for name in ("ops", "ops.boxes"):
        target = modules[f"torchvision.{name}"]
        target.batched_nms = batched_nms
        target.nms = nms
        target.box_area = box_area
    modules["torchvision.transforms.functional"].resize = resize
    modules["torchvision.transforms.functional"].to_pil_image = to_pil_image
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision"].__version__ = "0.0.0+colabel.stand_in"
    modules["torchvision.ops"].boxes = modules["torchvision.ops.boxes"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    # children first, the root last: a concurrent importer that sees "torchvision" sees all of them
    for name in reversed(STAND_IN_MODULES):
        sys.modules.setdefault(name, modules[name])
    return True
