"""Separable image filters on float32 images, written as whole-row numpy operations.

:func:`scipy.ndimage.gaussian_filter` and :func:`scipy.ndimage.maximum_filter` filter one line at a time;
along the first axis the lines are strided columns, which costs more than the arithmetic itself on small
kernels. Here a filter along either axis is a sum (or maximum) of shifted slices of the padded image, so
every operation runs over contiguous memory. Boundaries follow scipy's ``mode="reflect"``
(``d c b a | a b c d | d c b a``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian", "maximum"]


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """Normalised Gaussian weights ``w[0..r]`` (centre first), ``r = int(truncate * sigma + 0.5)``: the
    kernel :func:`scipy.ndimage.gaussian_filter` uses, one side of it (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    weights /= weights.sum()
    return weights[radius:]


def _along(image: np.ndarray, axis: int, start: int, length: int) -> np.ndarray:
    return image[start : start + length] if axis == 0 else image[:, start : start + length]


def _gaussian_axis(image: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    radius = len(weights) - 1
    size = image.shape[axis]
    if radius == 0:
        return image.copy()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="symmetric")
    out = _along(padded, axis, radius, size) * np.float32(weights[0])
    pair = np.empty_like(out)
    for k in range(1, radius + 1):
        np.add(_along(padded, axis, radius - k, size), _along(padded, axis, radius + k, size), out=pair)
        pair *= np.float32(weights[k])
        out += pair
    return out


def gaussian(image: np.ndarray, sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of a 2-D image, ``mode="reflect"``; float32 (H, W) in and out.

    The same kernel as :func:`scipy.ndimage.gaussian_filter` (``sigma`` in pixels, cut at ``truncate``
    sigmas); sums are accumulated in float32 (scipy uses float64), so values differ by about 1e-7
    relative. Kernels longer than the image fall back to scipy.
    """
    image = np.asarray(image, dtype=np.float32)
    weights = gaussian_kernel(sigma, truncate)
    if len(weights) - 1 >= min(image.shape):  # reflecting more than once: let scipy do it
        from scipy import ndimage as ndi

        return ndi.gaussian_filter(image, sigma, mode="reflect", truncate=truncate)
    return _gaussian_axis(_gaussian_axis(image, weights, 0), weights, 1)


def _maximum_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    before = size // 2
    after = size - 1 - before
    n = image.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (before, after)
    current = np.pad(image, pad, mode="symmetric")
    # window maxima of doubling widths: covered[i] = max(padded[i : i + width])
    width = 1
    while 2 * width <= size:
        length = current.shape[axis] - width
        current = np.maximum(_along(current, axis, 0, length), _along(current, axis, width, length))
        width *= 2
    if width < size:  # two overlapping windows of `width` cover `size`
        return np.maximum(_along(current, axis, 0, n), _along(current, axis, size - width, n))
    return _along(current, axis, 0, n).copy()


def maximum(image: np.ndarray, size: int) -> np.ndarray:
    """Maximum over a ``size`` x ``size`` window centred like :func:`scipy.ndimage.maximum_filter`
    (``mode="reflect"``); the same values exactly. 2-D, any real dtype; ``1 <= size``.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    image = np.asarray(image)
    if size // 2 >= min(image.shape):
        from scipy import ndimage as ndi

        return ndi.maximum_filter(image, size=size, mode="reflect")
    return _maximum_axis(_maximum_axis(image, size, 0), size, 1)
