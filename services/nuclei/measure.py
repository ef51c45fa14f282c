"""Per-nucleus measurements of an instance-label image: id, bbox, centroid, outline polygon, area, type.

Everything is computed for all nuclei at once with numpy (no Python loop over pixels or boundary edges);
only the final :class:`~.types.Nucleus` objects are built one by one.

Outlines
--------
The outline of a nucleus joins the midpoints of its boundary pixel edges in order: the level-0.5 contour
of its mask, as marching squares (``skimage.measure.find_contours``) draws it, with diagonally touching
pixels kept together. A pixel centre lies inside the ring exactly when the pixel belongs to the nucleus
or to a hole in it, so rasterising the ring gives back the filled mask. Midpoints on a straight line
through their neighbours are left out (exactly, no tolerance).

Each boundary edge is directed with the nucleus on its right (clockwise on screen, ``y`` down). Its
successor -- at its end vertex turn left if that edge of the same nucleus exists, else go straight, else
turn right -- follows from the two pixels ahead of the end vertex alone, and its index from a running
count of the edges of the nucleus pixels (memory: 8 bytes per image pixel, about 32 per nucleus pixel).
Following the successors from the nucleus's first edge (the top edge of its first pixel in raster order,
always on the outer boundary) walks the outer ring; the walk is done for all nuclei together by pointer
jumping (``log2`` of the longest ring rounds), which also tells hole rings (no start edge) apart. The rings
are simple polygons: every midpoint is visited once, and at a vertex where two pixels of the nucleus touch
diagonally the ring cuts the two free corners with two parallel segments half a pixel apart.
"""

from __future__ import annotations

import contextlib
import gc
from typing import NamedTuple

import numpy as np

from .types import Nucleus

__all__ = ["measure_nuclei", "outline_rings", "largest_pieces", "Rings"]

# unit vectors of the four edge directions, screen coordinates (x right, y down):
# 0 = right, 1 = down, 2 = left, 3 = up (clockwise on screen)
_UNIT = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)
# midpoint of the edge of direction d of pixel (r, c), as (x, y) - (c, r): top, right, bottom, left edge
_MID_X = np.array([0.5, 1.0, 0.5, 0.0])
_MID_Y = np.array([0.0, 0.5, 1.0, 0.5])


def _corner_table() -> np.ndarray:
    """``table[16 * previous + 4 * this + next]``: whether the midpoint of edge ``this`` is a ring vertex
    (the path through the midpoints of ``previous -> this -> next`` bends there)."""
    d = np.arange(64)
    prev, this, nxt = _UNIT[d // 16], _UNIT[(d // 4) % 4], _UNIT[d % 4]
    v1, v2 = prev + this, this + nxt
    return v1[:, 0] * v2[:, 1] - v1[:, 1] * v2[:, 0] != 0


_CORNER = _corner_table()


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while building many small acyclic containers (lists of coordinates):
    the allocations would trigger collections that scan every object of the process for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def largest_pieces(labels: np.ndarray) -> np.ndarray:
    """*labels* (a new uint32 array) with each label reduced to its largest 8-connected piece."""
    from skimage.measure import label as connected

    out = labels.astype(np.uint32, copy=True)
    if not out.any():
        return out
    pieces = connected(out, connectivity=2, background=0)
    n_pieces = int(pieces.max())
    owner = np.zeros(n_pieces + 1, dtype=np.int64)
    owner[pieces.ravel()] = out.ravel()
    n_labels = np.count_nonzero(np.bincount(owner[1:])) if n_pieces else 0
    if n_pieces == n_labels:
        return out
    sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    order = np.lexsort((-sizes[1:], owner[1:])) + 1  # by owner, largest piece first
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    keep = np.zeros(n_pieces + 1, dtype=bool)
    keep[order[first]] = True
    out[~keep[pieces]] = 0
    return out


class Rings(NamedTuple):
    """Outer outlines of labels ``1..n``: see :func:`outline_rings`."""

    coords: np.ndarray
    lengths: np.ndarray
    complete: bool


def outline_rings(labels: np.ndarray, n: int) -> Rings:
    """Outer outlines of labels ``1..n`` (see the module docstring), in ``[x, y]`` pixels of *labels*.

    Parameters
    ----------
    labels : ndarray (H, W) of unsigned int
        Labels ``1..n`` (0 = background), each present and one 8-connected piece.
    n : int
        Number of labels.

    Returns
    -------
    coords : ndarray (V, 2), float64
        Ring vertices (half-integer ``[x, y]``), label 1's ring first; rings are not closed (first vertex
        not repeated), clockwise on screen, starting at the first bend after the top edge of the label's
        first pixel in raster order.
    lengths : ndarray (n,), int64
        Vertices of each ring (at least 4).
    complete : bool
        Whether every boundary edge lies on an outer ring: no label has a hole or a second piece.
    """
    if n == 0:
        return Rings(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), True)
    # work on flat indices of the zero-padded image (stride w): vertex p = top-left corner of pixel p
    padded = np.pad(labels, 1)
    w = padded.shape[1]
    flat = padded.ravel()
    inside = np.flatnonzero(flat)  # raster order
    value = flat[inside]
    n_inside = len(inside)
    # rank of each nucleus pixel among them (entries of other pixels are never read)
    position = np.empty(len(flat), dtype=np.int32)
    position[inside] = np.arange(n_inside, dtype=np.int32)
    is_edge = np.empty((4, n_inside), dtype=bool)
    for direction, shift in enumerate((-w, 1, w, -1)):  # top, right, bottom, left neighbour
        np.not_equal(flat[inside + shift], value, out=is_edge[direction])
    # edges in direction order, each direction in raster order; index[d * n_inside + i] = index of the edge
    # (pixel i, direction d)
    is_edge = is_edge.ravel()
    index = np.cumsum(is_edge, dtype=np.int32) - 1
    direction, rank = np.divmod(np.flatnonzero(is_edge), n_inside)
    n_top = int(np.searchsorted(direction, 1))
    pixel = inside[rank]
    owner = value[rank].astype(np.int64)
    # successor, from the two pixels ahead of the end vertex: turn left onto the ahead-left pixel's edge if
    # that pixel is the label's (keeps diagonal pixels together), else go straight onto the ahead pixel's
    # edge if it is, else turn right onto this pixel's next edge
    ahead_left = pixel + np.array([1 - w, w + 1, w - 1, -w - 1], dtype=np.int64)[direction]
    ahead = pixel + np.array([1, w, -1, -w], dtype=np.int64)[direction]
    left = flat[ahead_left] == owner
    straight = ~left & (flat[ahead] == owner)
    next_pixel = position[np.where(left, ahead_left, np.where(straight, ahead, pixel))]
    next_direction = np.where(left, direction + 3, np.where(straight, direction, direction + 1)) % 4
    successor = next_direction * n_inside + next_pixel
    if not is_edge[successor].all():  # cannot happen for a label image; guard against silent garbage
        raise RuntimeError("broken boundary while tracing nucleus outlines")
    nxt = index[successor].astype(np.int64)
    n_edges = len(nxt)
    # first edge of each label: the top edge of its first pixel in raster order (top edges come first,
    # in raster order)
    first = np.full(n + 1, n_top, dtype=np.int64)
    np.minimum.at(first, owner[:n_top], np.arange(n_top))
    first = first[1:]
    if (first == n_top).any():
        raise RuntimeError("labels must be numbered 1..n without gaps")
    # pointer jumping: distance of every edge to the last edge of its outer ring (the one before the
    # first); edges of hole rings never reach an end and saturate at 2**rounds
    prv = np.empty_like(nxt)
    prv[nxt] = np.arange(n_edges)
    last = prv[first]
    jump = nxt.copy()
    jump[last] = last
    dist = np.ones(n_edges, dtype=np.int64)
    dist[last] = 0
    rounds = int(np.bincount(owner).max() - 1).bit_length()
    for _ in range(rounds):
        dist += dist[jump]
        jump = jump[jump]
    outer = np.flatnonzero(dist < (1 << rounds))
    ring_edges = dist[first] + 1
    offsets = np.concatenate([[0], np.cumsum(ring_edges)])
    ordered = np.empty(offsets[-1], dtype=np.int64)
    lab = owner[outer] - 1
    ordered[offsets[lab] + ring_edges[lab] - 1 - dist[outer]] = outer
    d = direction
    keep = _CORNER[16 * d[prv[ordered]] + 4 * d[ordered] + d[nxt[ordered]]]
    vertices = ordered[keep]
    row, col = np.divmod(pixel[vertices], w)
    coords = np.empty((len(vertices), 2), dtype=np.float64)
    coords[:, 0] = col + (_MID_X[direction[vertices]] - 1.0)  # padded frame -> labels frame
    coords[:, 1] = row + (_MID_Y[direction[vertices]] - 1.0)
    lengths = np.bincount(owner[vertices] - 1, minlength=n)
    return Rings(coords, lengths, len(outer) == n_edges)


def measure_nuclei(
    labels: np.ndarray,
    *,
    origin: tuple[int, int] = (0, 0),
    types: np.ndarray | None = None,
    type_probs: np.ndarray | None = None,
) -> tuple[np.ndarray, list[Nucleus]]:
    """Per-nucleus measurements of a label image; returns a cleaned, renumbered copy and the nuclei.

    Each label is reduced to its largest 8-connected piece (other pieces become background) and ids are
    renumbered ``1..N`` in increasing order of the input labels.

    Parameters
    ----------
    labels : ndarray (H, W) of int
        Not mutated.
    origin : (x, y)
        Offset of ``labels[0, 0]`` in the full image; added to every coordinate.
    types, type_probs : ndarray (H, W), optional
        Per-pixel instance type and probability (from :class:`~.base.Segmentation`); a nucleus takes the
        values at its first pixel in raster order.

    Returns
    -------
    labels : ndarray (H, W), uint32
    nuclei : list of Nucleus
        Polygons: the outer outline (holes filled) through the midpoints of the boundary pixel edges,
        see :func:`outline_rings`; ``area`` is the pixel count.
    """
    ox, oy = int(origin[0]), int(origin[1])
    out = labels.astype(np.uint32, copy=True)
    height, width = out.shape
    pixels = np.flatnonzero(out)  # flat indices of nucleus pixels, raster order
    values = out.ravel()[pixels]
    present = np.flatnonzero(np.bincount(values)) if len(values) else np.zeros(0, dtype=np.int64)
    n = len(present)
    if n == 0:
        return out, []
    if present[-1] != n:  # renumber 1..n
        lut = np.zeros(int(present[-1]) + 1, dtype=np.uint32)
        lut[present] = np.arange(1, n + 1, dtype=np.uint32)
        out, values = lut[out], lut[values]
    rings = outline_rings(out, n)
    if not rings.complete:  # a hole or a second piece somewhere: keep each label's largest piece
        cleaned = largest_pieces(out)
        if np.count_nonzero(cleaned) != len(pixels):
            out = cleaned
            pixels = np.flatnonzero(out)
            values = out.ravel()[pixels]
            rings = outline_rings(out, n)
    ids = values.astype(np.int64)
    r, c = np.divmod(pixels, width)
    area = np.bincount(ids, minlength=n + 1)[1:]
    # mean pixel centre (c + 0.5, r + 0.5), full-image frame
    cx = np.bincount(ids, weights=c, minlength=n + 1)[1:] / area + 0.5 + ox
    cy = np.bincount(ids, weights=r, minlength=n + 1)[1:] / area + 0.5 + oy
    # the pixel-corner box is the ring's: its extreme vertices are midpoints of the outermost pixel edges
    coords = rings.coords + (ox, oy)
    starts = np.concatenate([[0], np.cumsum(rings.lengths)[:-1]])
    bbox = np.stack(
        [
            np.minimum.reduceat(coords[:, 0], starts),
            np.minimum.reduceat(coords[:, 1], starts),
            np.maximum.reduceat(coords[:, 0], starts),
            np.maximum.reduceat(coords[:, 1], starts),
        ],
        axis=1,
    )
    kinds = probs = None
    if types is not None:  # the values at each nucleus's first pixel in raster order
        first = pixels[np.unique(ids, return_index=True)[1]]
        kinds = np.asarray(types).ravel()[first].astype(np.int64).tolist()
        if type_probs is not None:
            probs = np.asarray(type_probs).ravel()[first].astype(np.float64).tolist()
    with _gc_paused():
        xy = coords.tolist()  # one conversion for every ring: the per-ring cost is a list slice
        ends = np.cumsum(rings.lengths).tolist()
        nuclei: list[Nucleus] = []
        begin = 0
        for k, (end, box, x, y, size) in enumerate(
            zip(ends, bbox.tolist(), cx.tolist(), cy.tolist(), area.tolist(), strict=True)
        ):
            ring = xy[begin:end]
            ring.append(list(ring[0]))
            begin = end
            nuclei.append(
                Nucleus(
                    id=k + 1,
                    bbox=tuple(box),
                    centroid=(x, y),
                    polygon={"type": "Polygon", "coordinates": [ring]},
                    area=float(size),
                    type=None if kinds is None else kinds[k],
                    type_prob=None if probs is None else probs[k],
                )
            )
    return out, nuclei
