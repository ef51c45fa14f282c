"""Tiling of images larger than the model input: the grid, prompt routing, and merging across borders.

An image whose longest side exceeds ``tile_size`` is split, per axis, into the fewest windows of
``tile_size`` pixels that overlap by at least ``overlap`` pixels, spread evenly so the last ends at the
image edge; an axis not longer than ``tile_size`` is one window. Each tile owns a *core*: the part of it
closer to its own centre than to a neighbour's, bounded by the midpoints of the overlaps. Cores
partition the image, so every pixel has exactly one owning tile.

Boxes here are ``(x0, y0, x1, y1)`` in image pixels, half-open for integer tile boxes (columns
``x0 .. x1 - 1``), continuous for prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from colabel.errors import InvalidInputError

__all__ = [
    "Tile",
    "tile_grid",
    "route_prompt",
    "frontier_tiles",
    "merge_into",
    "interior_point",
]


@dataclass(frozen=True)
class Tile:
    """One tile: ``box`` in image pixels (half-open ints) and its ``core`` (the pixels it owns)."""

    index: int
    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the tile."""
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    @property
    def offset(self) -> np.ndarray:
        """``[x0, y0]``: add to tile coordinates to get image coordinates."""
        return np.array(self.box[:2], dtype=np.float64)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of this tile in an image array."""
        x0, y0, x1, y1 = self.box
        return slice(y0, y1), slice(x0, x1)

    def contains_box(self, box: np.ndarray) -> bool:
        x0, y0, x1, y1 = self.box
        return bool(box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1)

    def core_contains(self, x: float, y: float, image_shape: tuple[int, int]) -> bool:
        """Whether ``(x, y)`` lies in this tile's core (the image's far edges belong to the last core)."""
        cx0, cy0, cx1, cy1 = self.core
        height, width = image_shape
        in_x = cx0 <= x < cx1 or (x == cx1 == width)
        in_y = cy0 <= y < cy1 or (y == cy1 == height)
        return in_x and in_y


def _axis(length: int, tile_size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(start, stop, core_start, core_stop)`` windows along one axis."""
    if length <= tile_size:
        return [(0, length, 0, length)]
    n = math.ceil((length - overlap) / (tile_size - overlap))
    starts = [int(math.floor(i * (length - tile_size) / (n - 1))) for i in range(n)]
    stops = [s + tile_size for s in starts]
    bounds = [0] + [(starts[i + 1] + stops[i]) // 2 for i in range(n - 1)] + [length]
    return [(starts[i], stops[i], bounds[i], bounds[i + 1]) for i in range(n)]


def tile_grid(image_shape: tuple[int, int], *, tile_size: int, overlap: int = 64) -> tuple[Tile, ...]:
    """Tiles covering an image of ``(height, width)``, row-major (left to right, then top to bottom).

    Parameters
    ----------
    image_shape : (int, int)
        ``(height, width)``.
    tile_size : int
        Longest tile side; an image with ``max(height, width) <= tile_size`` is one tile.
    overlap : int, default 64
        Minimum overlap of neighbouring tiles, ``0 <= overlap < tile_size``.

    Examples
    --------
    >>> [t.box for t in tile_grid((300, 600), tile_size=256, overlap=64)][:3]
    [(0, 0, 256, 256), (172, 0, 428, 256), (344, 0, 600, 256)]
    """
    height, width = (int(v) for v in image_shape)
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image shape must be positive, got {image_shape}")
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 16:
        raise InvalidInputError(f"tile_size must be an int >= 16, got {tile_size!r}")
    if not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile_size:
        raise InvalidInputError(f"overlap must be an int in 0..{tile_size - 1}, got {overlap!r}")
    if max(height, width) <= tile_size:
        return (Tile(0, (0, 0, width, height), (0, 0, width, height)),)
    tiles = []
    for ys, ye, cys, cye in _axis(height, tile_size, overlap):
        for xs, xe, cxs, cxe in _axis(width, tile_size, overlap):
            tiles.append(Tile(len(tiles), (xs, ys, xe, ye), (cxs, cys, cxe, cye)))
    return tuple(tiles)


def route_prompt(
    tiles: tuple[Tile, ...],
    image_shape: tuple[int, int],
    *,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    box: np.ndarray | None,
) -> int:
    """Index of the tile that should decode a prompt.

    The prompt's anchor is the centre of its box, else the mean of its positive points, else of all
    points. Among tiles that contain the whole prompt (every point and the box), the one whose core
    holds the anchor wins, else the one whose centre is nearest the anchor; when no tile contains the
    whole prompt, the tile whose core holds the anchor.
    """
    if len(tiles) == 1:
        return 0
    extent = []
    if points is not None and len(points):
        extent.append(points)
    if box is not None:
        extent.append(np.asarray(box, dtype=np.float64).reshape(2, 2))
    everything = np.concatenate(extent)
    if box is not None:
        anchor = everything[-2:].mean(axis=0)
    elif labels is not None and np.any(labels == 1):
        anchor = points[labels == 1].mean(axis=0)
    else:
        anchor = points.mean(axis=0)
    bbox = np.array([*everything.min(axis=0), *everything.max(axis=0)])
    candidates = [t for t in tiles if t.contains_box(bbox)]
    pool = candidates or list(tiles)
    for t in pool:
        if t.core_contains(float(anchor[0]), float(anchor[1]), image_shape):
            return t.index
    return min(pool, key=lambda t: (t.centre[0] - anchor[0]) ** 2 + (t.centre[1] - anchor[1]) ** 2).index


def frontier_tiles(
    tiles: tuple[Tile, ...],
    canvas: np.ndarray,
    decoded: list[int] | tuple[int, ...],
) -> list[int]:
    """Tiles not yet decoded into which the object in *canvas* may continue, most promising first.

    The object may continue wherever one of its pixels has a neighbour (8-connected) that lies inside
    the image but outside every decoded tile: borders with the image edge or with already decoded tiles
    do not count. Returns the indices of undecoded tiles containing such frontier pixels, by decreasing
    number of frontier pixels (ties: lower index first).

    Parameters
    ----------
    tiles : tuple of Tile
    canvas : ndarray of bool, shape (H, W)
        The object so far.
    decoded : sequence of int
        Indices of the tiles already decoded.
    """
    from scipy.ndimage import binary_dilation

    rows, cols = np.nonzero(canvas)
    if rows.size == 0:
        return []
    height, width = canvas.shape
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, height)
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, width)
    window = canvas[r0:r1, c0:c1]
    covered = np.zeros_like(window)
    for index in decoded:
        x0, y0, x1, y1 = tiles[index].box
        covered[max(y0 - r0, 0):max(y1 - r0, 0), max(x0 - c0, 0):max(x1 - c0, 0)] = True
    frontier = binary_dilation(window, structure=np.ones((3, 3), bool)) & ~covered
    fr, fc = np.nonzero(frontier)
    if fr.size == 0:
        return []
    fy, fx = fr + r0, fc + c0
    counts = []
    for t in tiles:
        if t.index in decoded:
            continue
        x0, y0, x1, y1 = t.box
        n = int(np.count_nonzero((fx >= x0) & (fx < x1) & (fy >= y0) & (fy < y1)))
        if n:
            counts.append((-n, t.index))
    return [index for _, index in sorted(counts)]


def merge_into(
    canvas: np.ndarray,
    tile_mask: np.ndarray,
    tile: Tile,
    *,
    seeds: np.ndarray | None = None,
) -> np.ndarray:
    """Union of *canvas* with the parts of a tile's mask that continue the object.

    Parameters
    ----------
    canvas : ndarray of bool, shape (H, W)
        The object so far, in image pixels. Not mutated.
    tile_mask : ndarray of bool, shape tile.shape
        A mask decoded on *tile*.
    tile : Tile
    seeds : ndarray, shape (K, 2), optional
        ``[x, y]`` image points (positive prompts): a component containing one is kept too.

    Returns
    -------
    merged : ndarray of bool, shape (H, W)
        *canvas* united with every 8-connected component of *tile_mask* that overlaps *canvas* or
        contains a seed; components unconnected to the object (spurious blobs) are left out. When
        *canvas* is empty and there are no seeds, the whole tile mask is taken.
    """
    from skimage.measure import label

    rows, cols = tile.slices()
    merged = canvas.copy()
    tile_mask = np.asarray(tile_mask, dtype=bool)
    if tile_mask.shape != tile.shape:
        raise InvalidInputError(f"tile mask has shape {tile_mask.shape}, expected {tile.shape}")
    if not tile_mask.any():
        return merged
    region = canvas[rows, cols]
    if not region.any() and (seeds is None or len(seeds) == 0):
        merged[rows, cols] |= tile_mask
        return merged
    labels = label(tile_mask, connectivity=2)
    keep = set(np.unique(labels[region & tile_mask]).tolist())
    if seeds is not None:
        x0, y0 = tile.box[:2]
        h, w = tile.shape
        for x, y in np.asarray(seeds, dtype=np.float64).reshape(-1, 2):
            c, r = int(math.floor(x)) - x0, int(math.floor(y)) - y0
            if 0 <= r < h and 0 <= c < w and labels[r, c]:
                keep.add(int(labels[r, c]))
    keep.discard(0)
    if keep:
        merged[rows, cols] |= np.isin(labels, sorted(keep))
    return merged


def interior_point(mask: np.ndarray) -> np.ndarray | None:
    """``[x, y]`` (pixel centre) of the mask pixel farthest from the background, or None if empty."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([c + 0.5, r + 0.5])
