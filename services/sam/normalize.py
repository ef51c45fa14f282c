"""Any microscopy image -> the ``(H, W, 3)`` uint8 RGB array SAM's encoder expects.

Rules (channels are last; a ``(C, H, W)`` stack is *not* guessed):

* ``(H, W)`` and ``(H, W, 1)``: grey, replicated to three channels.
* ``(H, W, 3)``: RGB as is. ``(H, W, 4)``: RGBA, alpha dropped (first three channels).
* ``(H, W, 2)`` or 5 to 16 channels (multiplexed fluorescence): the mean over channels, as grey.
* More than 16 channels last is refused: almost always a ``(C, H, W)`` stack given channels-first.
* ``uint8`` values are used unchanged; ``bool`` becomes 0 / 255.
* Every other dtype (uint16, int, float): intensities are rescaled linearly so the 0.5th percentile
  becomes 0 and the 99.5th percentile 255 (clipped), computed over all kept channels together so colour
  balance is preserved. Non-finite values count as the low end. A constant image becomes all zeros.
  (Colab scales per channel between min and max, which lets one hot pixel darken a 16-bit image.)
"""

from __future__ import annotations

import numpy as np

from colabel.errors import InvalidInputError

__all__ = ["to_uint8_rgb", "LOW_PERCENTILE", "HIGH_PERCENTILE", "MAX_CHANNELS"]

#: Most channels (last axis) accepted. Multiplexed panels of up to 16 markers are averaged to grey; more is
#: almost always a ``(C, H, W)`` stack passed channels-first (its H rows would be read as channels).
MAX_CHANNELS = 16

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
_MAX_SAMPLES = 1 << 20


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    flat = values.reshape(-1)
    if flat.size > _MAX_SAMPLES:  # a strided sample is plenty for two percentiles
        flat = flat[:: flat.size // _MAX_SAMPLES]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:  # heavy-tailed or nearly constant: fall back to the full range
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Normalise an image to ``(H, W, 3)`` uint8 RGB (see the module docstring for the rules).

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, C), any real or bool dtype
        Not mutated.

    Returns
    -------
    rgb : ndarray, shape (H, W, 3), uint8
        A new array (never a view of *image*).

    Raises
    ------
    InvalidInputError
        Wrong number of dimensions, an empty image, more than :data:`MAX_CHANNELS` channels last, or a
        non-numeric / complex dtype.

    Examples
    --------
    >>> to_uint8_rgb(np.array([[0, 1000], [2000, 4000]], np.uint16))[..., 0]
    array([[  0,  64],
           [128, 255]], dtype=uint8)
    """
    try:
        array = np.asarray(image)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInputError(f"image must be a numeric array: {exc}") from None
    if array.ndim not in (2, 3):
        raise InvalidInputError(f"image must have shape (H, W) or (H, W, C), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0 or (array.ndim == 3 and array.shape[2] == 0):
        raise InvalidInputError(f"image must not be empty, got shape {array.shape}")
    if array.ndim == 3 and array.shape[2] > MAX_CHANNELS:
        raise InvalidInputError(
            f"image of shape {array.shape} has {array.shape[2]} channels last, more than {MAX_CHANNELS}: give "
            f"(H, W) or (H, W, C) with the channels last; a (C, H, W) stack needs np.moveaxis(image, 0, -1)"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidInputError(f"image dtype must be integer, float or bool, got {array.dtype}")
    if array.ndim == 3:
        channels = array.shape[2]
        if channels == 1:
            array = array[:, :, 0]
        elif channels in (3, 4):
            array = array[:, :, :3]
        else:
            array = array.astype(np.float64).mean(axis=2)
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        lo, hi = _percentiles(values)
        values = np.where(np.isfinite(values), values, lo)
        if hi > lo:
            values = np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255)
        else:
            values = np.zeros_like(values)
        array = np.rint(values).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.array(array, dtype=np.uint8, order="C", copy=True)
