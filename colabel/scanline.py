"""Polygon filling by scanlines: the pixels of polygons in time proportional to their rows and their area.

``skimage.draw.polygon`` tests every pixel of the polygon's bounding box against every edge, so one
polygon of ``n`` vertices spanning an ``H x W`` image costs ``H * W * n`` steps (16 s for a 5000-vertex
outline on a 2048 px image), and a few thousand thin triangles across an image cost minutes. Here each
edge is intersected with the pixel rows it crosses and the runs between crossings are filled, for many
rings at once: the cost is :func:`edge_rows` plus the area. The result is the same set of pixels as
``skimage.draw.polygon`` gives for a simple polygon: a point ``(r, c)`` with integer coordinates is inside
when the even-odd rule says so, or when it lies exactly on an edge or a vertex.

Rings are passed concatenated: vertex arrays ``rows, cols`` of shape ``(N,)`` and ``starts``, shape
``(R,)``, the index of each ring's first vertex (increasing, ``starts[0] == 0``). A ring may or may not
repeat its first vertex at its end.
"""

from __future__ import annotations

import numpy as np

__all__ = ["edge_rows", "polygon_pixels", "ring_areas", "rings_pixels"]


def _previous(n: int, starts: np.ndarray) -> np.ndarray:
    """Index of each vertex's predecessor within its ring (a ring's first vertex follows its last)."""
    prev = np.arange(n) - 1
    if n:
        ends = np.append(starts[1:], n)
        prev[starts] = ends - 1
    return prev


def _starts(n: int, starts) -> np.ndarray:
    return np.zeros(1 if n else 0, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)


def edge_rows(rows, starts=None) -> int:
    """How many (edge, integer row) pairs a scanline fill of the rings visits: its cost, known before filling.

    Parameters
    ----------
    rows : array_like, shape (N,), float
        Row coordinates of the rings' vertices, concatenated.
    starts : array_like, shape (R,), int, optional
        First vertex of each ring (one ring when omitted).
    """
    rows = np.asarray(rows, dtype=np.float64).ravel()
    prev = rows[_previous(rows.size, _starts(rows.size, starts))]
    lo, hi = np.minimum(rows, prev), np.maximum(rows, prev)
    return int((np.floor(hi) - np.ceil(lo) + 1).clip(min=0).sum())


def ring_areas(rows, cols, starts=None) -> np.ndarray:
    """Signed area of each ring (shoelace formula), shape ``(R,)`` float64, in squared pixel units."""
    rows = np.asarray(rows, dtype=np.float64).ravel()
    cols = np.asarray(cols, dtype=np.float64).ravel()
    starts = _starts(rows.size, starts)
    if not rows.size:
        return np.zeros(0)
    prev = _previous(rows.size, starts)
    cross = cols[prev] * rows - cols * rows[prev]
    return 0.5 * np.add.reduceat(cross, starts)


def _runs(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, stops)])`` without a Python loop.

    One running sum over the output: each element is 1 more than the one before, but where a run starts, which
    steps from the previous run's last value to the run's own start.
    """
    lengths = (stops - starts).clip(min=0)
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    if not lengths.size:
        return np.zeros(0, dtype=np.int64)
    steps = np.ones(int(lengths.sum()), dtype=np.int64)
    heads = np.cumsum(lengths) - lengths
    steps[0] = starts[0]
    steps[heads[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps, out=steps)


def rings_pixels(rows, cols, starts, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels inside each of many rings, as ``skimage.draw.polygon`` gives them ring by ring.

    Parameters
    ----------
    rows, cols : array_like, shape (N,), float
        The rings' vertices, concatenated, in pixel units: the point ``(r, c)`` is the centre of pixel
        ``(r, c)``.
    starts : array_like, shape (R,), int
        First vertex of each ring.
    shape : tuple of 2 int
        ``(height, width)``: pixels outside ``[0, height) x [0, width)`` are dropped.

    Returns
    -------
    ring, index : ndarray, shape (M,), int64
        For each pixel inside a ring (even-odd rule) or on its boundary: the ring's number (0-based) and
        the pixel's flat index ``r * width + c``; each (ring, pixel) pair once, ordered by ring then index.
    """
    rows = np.asarray(rows, dtype=np.float64).ravel()
    cols = np.asarray(cols, dtype=np.float64).ravel()
    height, width = int(shape[0]), int(shape[1])
    empty = np.zeros(0, dtype=np.int64)
    if rows.size == 0 or height <= 0 or width <= 0:
        return empty, empty
    starts = np.asarray(starts, dtype=np.int64)
    ring_of = np.repeat(np.arange(starts.size), np.diff(np.append(starts, rows.size)))
    prev = _previous(rows.size, starts)
    yj, xj, yi, xi = rows[prev], cols[prev], rows, cols  # j: the previous vertex, i: this one (skimage's names)
    lo, hi = np.minimum(yi, yj), np.maximum(yi, yj)
    # only rows 0..height-1 matter: every edge's rows are clipped to them before anything is generated
    first = np.maximum(np.ceil(lo), 0).astype(np.int64)
    last = np.minimum(np.floor(hi), height - 1).astype(np.int64)  # closed: boundary points need hi itself
    count = (last - first + 1).clip(min=0)
    edge = np.repeat(np.arange(rows.size), count)
    r = _runs(first, first + count)
    y = r.astype(np.float64)
    sloped = yi[edge] != yj[edge]
    x = np.full(r.shape, np.nan)
    e = edge[sloped]
    x[sloped] = (xj[e] - xi[e]) * (y[sloped] - yi[e]) / (yj[e] - yi[e]) + xi[e]
    ring = ring_of[edge]

    # interior, the even-odd rule on crossings with lo <= y < hi: pixel c is inside when an odd number of
    # its ring's crossings lie right of it, i.e. c in [x0, x1), [x2, x3), ... of the sorted crossings
    crossing = sloped & (y < hi[edge])
    cring, cr, cx = ring[crossing], r[crossing], x[crossing]
    order = np.lexsort((cx, cr, cring))  # every (ring, row) holds an even number of crossings
    cring, cr, cx = cring[order], cr[order], cx[order]
    span_starts = np.clip(np.ceil(cx[0::2]), 0, width).astype(np.int64)
    span_stops = np.clip(np.ceil(cx[1::2]), 0, width).astype(np.int64)
    # every pixel as the key ring * (height * width) + its flat index: a span's keys are one run of integers
    size = height * width
    span_keys = cring[0::2] * size + cr[0::2] * width
    inside = _runs(span_keys + span_starts, span_keys + span_stops)

    # boundary: integer points exactly on a sloped edge, and the integer stretch of horizontal edges
    on_slope = sloped & (x == np.floor(x)) & (x >= 0) & (x < width)
    slope = ring[on_slope] * size + r[on_slope] * width + x[on_slope].astype(np.int64)
    flat = ~sloped & (y == yi[edge])
    fe = edge[flat]
    c0 = np.clip(np.ceil(np.minimum(xi[fe], xj[fe])), 0, width).astype(np.int64)
    c1 = np.clip(np.floor(np.maximum(xi[fe], xj[fe])) + 1, 0, width).astype(np.int64)
    flat_keys = ring[flat] * size + r[flat] * width
    flats = _runs(flat_keys + c0, flat_keys + c1)

    # one (ring, pixel) pair each, sorted (np.unique hashes: slower); the interior's keys are already in order, one
    # sorted run, so a stable sort (runs merged, not a quicksort of everything) takes a fraction of the time
    key = np.sort(np.concatenate([inside, slope, flats]), kind="stable")
    key = key[np.append(True, key[1:] != key[:-1])] if key.size else key
    return np.divmod(key, size)


def polygon_pixels(rows, cols, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(rr, cc)`` inside one polygon, as ``skimage.draw.polygon(rows, cols, shape)``.

    Parameters are those of :func:`rings_pixels` for one ring; returns two int64 arrays, shape ``(M,)``,
    ordered by row then column.
    """
    _, index = rings_pixels(rows, cols, [0], shape)
    width = int(shape[1])
    return index // width, index % width
