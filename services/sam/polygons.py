"""Binary masks to GeoJSON polygons in image pixel coordinates.

Coordinates follow :mod:`colabel.coords`: ``[x, y]`` with ``x`` = column, ``y`` = row, origin at the
top-left corner of the top-left pixel, pixel ``(r, c)`` covering ``[c, c + 1) x [r, r + 1)``. Contours
come from :func:`skimage.measure.find_contours` at level 0.5 on the mask padded by one pixel, so every
ring is closed and runs through the midpoints of the edges between object and background pixel centres
(a single pixel becomes a diamond of area 0.5). Rings are told apart by orientation (outer
boundaries wind one way, holes the other), each hole goes to the smallest outer boundary containing it,
and every part is lightly simplified with topology preserved. The result passes
``colabel.apps.provider.annotations.validate_feature_collection`` for ``image_shape = mask.shape``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from colabel.coords import rc_to_xy
from colabel.errors import InvalidInputError

__all__ = ["mask_to_features", "mask_to_geometry"]


def _rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contour rings of *mask* in ``xy`` pixel coordinates.

    With scikit-image's default ``positive_orientation="low"`` and ``y`` pointing down, the boundary of a
    region of True pixels has a positive shoelace area in ``xy`` and the boundary of a hole a negative
    one (checked by the tests), which tells shells from holes without any geometric test.
    """
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for contour in find_contours(padded, 0.5):
        xy = rc_to_xy(contour - 1.0) + 0.5  # padded pixel-centre (row, col) -> image (x, y)
        if len(xy) >= 4:
            rings.append(xy)
    return rings


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def mask_to_geometry(mask: np.ndarray, *, simplify_tolerance: float = 0.25, min_area: float = 0.0):
    """The region of *mask* as a shapely ``Polygon`` / ``MultiPolygon`` (None when empty).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
    simplify_tolerance : float, default 0.25
        Douglas-Peucker tolerance in pixels, topology preserved; 0 keeps every contour vertex.
    min_area : float, default 0
        Parts with a smaller area (pixels) are dropped.
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"mask must have shape (H, W), got {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        return None
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for ring in _rings(mask):
        area = _signed_area(ring)
        if area > 0:
            shells.append(ring)
        elif area < 0:
            holes.append(ring)
    if not shells:
        return None
    shell_polys = [Polygon(r) for r in shells]
    areas = np.array([p.area for p in shell_polys])
    assigned: list[list[np.ndarray]] = [[] for _ in shells]
    if holes:
        tree = shapely.STRtree(shell_polys)
        for hole in holes:
            # a hole ring never touches a contour, so its first vertex lies inside exactly its parent
            # shell and the shells enclosing that one: the parent is the smallest of them
            hits = tree.query(shapely.Point(hole[0]), predicate="intersects")
            if len(hits):
                assigned[int(hits[np.argmin(areas[hits])])].append(hole)
    parts = []
    for shell, hole_rings in zip(shells, assigned, strict=True):
        poly = Polygon(shell, hole_rings)
        if simplify_tolerance > 0:
            poly = poly.simplify(simplify_tolerance, preserve_topology=True)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        for g in getattr(poly, "geoms", [poly]):  # make_valid may return a collection: keep polygons
            candidates = g.geoms if isinstance(g, MultiPolygon) else [g]
            for c in candidates:
                if isinstance(c, Polygon) and not c.is_empty and c.area > max(min_area, 0.0):
                    parts.append(orient(c, sign=1.0))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _coords(geometry) -> dict[str, Any]:
    from shapely.geometry import mapping

    def lists(obj):
        if isinstance(obj, (tuple, list)):
            if obj and isinstance(obj[0], (int, float)):
                return [float(v) for v in obj]
            return [lists(o) for o in obj]
        return obj

    g = mapping(geometry)
    return {"type": g["type"], "coordinates": lists(g["coordinates"])}


def mask_to_features(
    mask: np.ndarray,
    *,
    properties: dict[str, Any] | None = None,
    simplify_tolerance: float = 0.25,
    min_area: float = 0.0,
    split: bool = False,
) -> list[dict[str, Any]]:
    """GeoJSON Features outlining a binary mask, holes kept, in image pixel ``[x, y]`` coordinates.

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
    properties : dict, optional
        Copied into each feature's ``properties`` (``{}`` by default).
    simplify_tolerance : float, default 0.25
        Light simplification (pixels), topology preserved.
    min_area : float, default 0
        Drop parts smaller than this (pixels).
    split : bool, default False
        False: one Feature for the whole mask (``Polygon``, or ``MultiPolygon`` when it has several
        parts), the natural shape of one SAM object. True: one ``Polygon`` Feature per part.

    Returns
    -------
    features : list of dict
        Empty for an empty mask.

    Examples
    --------
    >>> m = np.zeros((6, 6), bool); m[1:5, 1:5] = True; m[2:4, 2:4] = False
    >>> f = mask_to_features(m, simplify_tolerance=0)[0]
    >>> f["geometry"]["type"], len(f["geometry"]["coordinates"])  # one shell, one hole
    ('Polygon', 2)
    """
    geometry = mask_to_geometry(mask, simplify_tolerance=simplify_tolerance, min_area=min_area)
    if geometry is None:
        return []
    parts = list(getattr(geometry, "geoms", [geometry])) if split else [geometry]
    return [
        {"type": "Feature", "geometry": _coords(part), "properties": dict(properties or {})}
        for part in parts
    ]
