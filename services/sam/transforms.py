"""Exact mapping between image pixel coordinates and SAM's model input frame.

SAM resizes an image of ``original_size = (H, W)`` so that its longest side is ``long_side`` (the
encoder's ``img_size``, 1024 for the published models) with :class:`ResizeLongestSide`, giving
``input_size = (h, w)`` (:func:`preprocess_shape`), and pads the bottom/right to a square. Coordinates
scale *per axis* by ``w / W`` and ``h / H`` (not by one scalar: ``h`` and ``w`` are rounded to
integers), exactly as ``ResizeLongestSide.apply_coords`` does. Masks come back through
``Sam.postprocess_masks(masks, input_size, original_size)``.

Pixel convention: colabel's ``[x, y]`` are continuous, origin at the top-left *corner* of the image
(:mod:`colabel.coords`). SAM's prompt encoder adds 0.5 to every point and box corner ("shift to the
centre of the pixel"), i.e. it reads its inputs as pixel *indices*. :func:`points_to_model` therefore
subtracts 0.5 after scaling, so that the position SAM encodes is exactly the scaled continuous position;
a box ``[0, 0, W, H]`` is encoded as exactly the image's extent in the input frame.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

__all__ = [
    "preprocess_shape",
    "scale_factors",
    "points_to_model",
    "points_from_model",
    "box_to_model",
    "box_from_model",
]


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(h, w)`` of an image resized so its longest side is *long_side* (``ResizeLongestSide`` rule).

    Examples
    --------
    >>> preprocess_shape(300, 600, 1024)
    (512, 1024)
    >>> preprocess_shape(333, 1000, 1024)  # 340.99 rounds half up to 341
    (341, 1024)
    """
    if height <= 0 or width <= 0 or long_side <= 0:
        raise InvalidInputError(f"sizes must be positive, got height={height}, width={width}, long_side={long_side}")
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def scale_factors(original_size: tuple[int, int], long_side: int) -> tuple[float, float]:
    """``(sx, sy) = (w / W, h / H)``: how model-frame ``x`` and ``y`` relate to image ``x`` and ``y``."""
    height, width = (int(v) for v in original_size)
    new_h, new_w = preprocess_shape(height, width, long_side)
    return new_w / width, new_h / height


def _xy(points: ArrayLike, name: str) -> np.ndarray:
    array = np.array(points, dtype=np.float64)
    if array.ndim == 1 and array.size == 2:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f"{name} must have shape (N, 2), got {array.shape}")
    return array


def points_to_model(points: ArrayLike, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Image ``[x, y]`` pixels -> the coordinates SAM's prompt encoder expects.

    Parameters
    ----------
    points : array-like, shape (N, 2)
        Continuous ``[x, y]`` in the image of *original_size* ``(H, W)``.
    original_size : (int, int)
    long_side : int

    Returns
    -------
    model : ndarray, shape (N, 2), float64
        ``(x * w / W - 0.5, y * h / H - 0.5)``.

    Examples
    --------
    >>> points_to_model([[600, 300], [0, 0]], (300, 600), 256)
    array([[255.5, 127.5],
           [ -0.5,  -0.5]])
    """
    sx, sy = scale_factors(original_size, long_side)
    out = _xy(points, "points")
    out[:, 0] = out[:, 0] * sx - 0.5
    out[:, 1] = out[:, 1] * sy - 0.5
    return out


def points_from_model(points: ArrayLike, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Inverse of :func:`points_to_model`: SAM prompt coordinates -> image ``[x, y]`` pixels."""
    sx, sy = scale_factors(original_size, long_side)
    out = _xy(points, "points")
    out[:, 0] = (out[:, 0] + 0.5) / sx
    out[:, 1] = (out[:, 1] + 0.5) / sy
    return out


def box_to_model(box: ArrayLike, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Image box ``[x0, y0, x1, y1]`` -> SAM box prompt, shape (4,), float64 (corners as in
    :func:`points_to_model`)."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise InvalidInputError(f"box must have 4 numbers [x0, y0, x1, y1], got shape {np.shape(box)}")
    return points_to_model(b.reshape(2, 2), original_size, long_side).reshape(4)


def box_from_model(box: ArrayLike, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Inverse of :func:`box_to_model`."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise InvalidInputError(f"box must have 4 numbers [x0, y0, x1, y1], got shape {np.shape(box)}")
    return points_from_model(b.reshape(2, 2), original_size, long_side).reshape(4)
