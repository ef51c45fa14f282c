"""The one place where colabel converts between coordinate conventions.

Three conventions meet in colabel:

``rc``
    numpy's ``(row, col)``: the first index is the row, counted down from the top.
``xy``
    GeoJSON / QuPath / SAM ``(x, y)``: ``x`` = column, ``y`` = row, ``y`` grows downwards, origin at the
    top-left corner of the top-left pixel.
``ol``
    OpenLayers' pixel projection ``(x, y_up)``: ``x`` = column, ``y_up = height - y`` grows upwards,
    origin at the bottom-left corner of the image.

Pixel-corner convention: pixel ``(r, c)`` covers the square ``[c, c + 1) x [r, r + 1)`` in ``xy``, so its
centre is ``(c + 0.5, r + 0.5)``. :func:`rc_to_xy` and :func:`xy_to_rc` swap axes only and do *not* add or
remove this half pixel: ``rc_to_xy([[r, c]])`` is the top-left *corner* of pixel ``(r, c)``. Add ``0.5``
yourself to get pixel centres (``rc_to_xy(rc) + 0.5``), e.g. for contours from
``skimage.measure.find_contours``, which are in pixel-centre ``rc`` units.

Every function takes an array-like of shape ``(N, 2)`` (a numpy array or a list of pairs), returns a new
``float64`` array and never mutates its input.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

__all__ = ["rc_to_xy", "xy_to_rc", "xy_to_ol", "ol_to_xy", "bbox_xy"]


def _points(points: ArrayLike) -> np.ndarray:
    """Return a new float64 ``(N, 2)`` copy of *points*, or raise :class:`InvalidInputError`."""
    try:
        array = np.array(points, dtype=np.float64)  # np.array copies: the input is never aliased
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"points must be numbers of shape (N, 2): {exc}") from None
    if array.size == 0:
        return array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f"points must have shape (N, 2), got shape {array.shape}")
    return array


def rc_to_xy(points: ArrayLike) -> np.ndarray:
    """Convert numpy ``(row, col)`` points to GeoJSON/SAM ``(x, y)`` points.

    Parameters
    ----------
    points : array-like, shape (N, 2)
        ``(row, col)`` coordinates, any real dtype.

    Returns
    -------
    xy : ndarray, shape (N, 2), float64
        ``(x, y)`` with ``x = col`` and ``y = row`` (``y`` down). No half-pixel shift is applied:
        the corner of pixel ``(r, c)`` maps to the corner ``(c, r)``.

    Examples
    --------
    >>> rc_to_xy([[1, 2]])
    array([[2., 1.]])
    >>> rc_to_xy([[1, 2]]) + 0.5  # centre of pixel (row 1, col 2)
    array([[2.5, 1.5]])
    """
    return _points(points)[:, ::-1].copy()


def xy_to_rc(points: ArrayLike) -> np.ndarray:
    """Convert GeoJSON/SAM ``(x, y)`` points to numpy ``(row, col)`` points.

    Parameters
    ----------
    points : array-like, shape (N, 2)
        ``(x, y)`` coordinates, ``x`` = column, ``y`` = row (``y`` down).

    Returns
    -------
    rc : ndarray, shape (N, 2), float64
        ``(row, col)`` = ``(y, x)``, unrounded. ``np.floor(rc).astype(int)`` is the pixel that contains
        each point (pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``).

    Examples
    --------
    >>> xy_to_rc([[2.5, 1.5]])
    array([[1.5, 2.5]])
    """
    return _points(points)[:, ::-1].copy()


def xy_to_ol(points: ArrayLike, *, height: float) -> np.ndarray:
    """Convert GeoJSON ``(x, y)`` (``y`` down) to OpenLayers pixel ``(x, y_up)``.

    Parameters
    ----------
    points : array-like, shape (N, 2)
        ``(x, y)`` coordinates, ``y`` down from the top edge.
    height : float
        Image height in pixels (rows of the level the coordinates refer to).

    Returns
    -------
    ol : ndarray, shape (N, 2), float64
        ``(x, height - y)``: ``y_up`` grows upwards from the bottom edge.

    Examples
    --------
    >>> xy_to_ol([[3, 0], [3, 10]], height=10)
    array([[ 3., 10.],
           [ 3.,  0.]])
    """
    out = _points(points)
    out[:, 1] = height - out[:, 1]
    return out


def ol_to_xy(points: ArrayLike, *, height: float) -> np.ndarray:
    """Convert OpenLayers pixel ``(x, y_up)`` to GeoJSON ``(x, y)`` (``y`` down).

    Parameters
    ----------
    points : array-like, shape (N, 2)
        ``(x, y_up)`` coordinates, ``y_up`` up from the bottom edge.
    height : float
        Image height in pixels.

    Returns
    -------
    xy : ndarray, shape (N, 2), float64
        ``(x, height - y_up)``. The inverse of :func:`xy_to_ol`.

    Examples
    --------
    >>> ol_to_xy([[3, 10]], height=10)
    array([[3., 0.]])
    """
    out = _points(points)
    out[:, 1] = height - out[:, 1]
    return out


def bbox_xy(points: ArrayLike) -> tuple[float, float, float, float]:
    """Bounding box of ``(x, y)`` points.

    Parameters
    ----------
    points : array-like, shape (N, 2), N >= 1
        ``(x, y)`` coordinates.

    Returns
    -------
    bbox : tuple of 4 float
        ``(xmin, ymin, xmax, ymax)``, as Python floats.

    Raises
    ------
    InvalidInputError
        If *points* is empty or not of shape ``(N, 2)``.

    Examples
    --------
    >>> bbox_xy([[1, 5], [3, 2]])
    (1.0, 2.0, 3.0, 5.0)
    """
    array = _points(points)
    if len(array) == 0:
        raise InvalidInputError("the bounding box of no points is undefined")
    xmin, ymin = array.min(axis=0)
    xmax, ymax = array.max(axis=0)
    return float(xmin), float(ymin), float(xmax), float(ymax)
