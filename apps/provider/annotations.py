"""Annotation payloads: validation, normalisation and rasterisation of QuPath-style GeoJSON.

An annotation is a GeoJSON ``FeatureCollection`` in QuPath's conventions: coordinates are ``[x, y]``
pixels of the full-resolution image (``x`` = column, ``y`` = row, ``y`` down, origin at the top-left
corner of the top-left pixel; see :mod:`colabel.coords`), ``properties.objectType`` is one of QuPath's
object types and ``properties.classification`` is ``{"name": str, "color": [r, g, b]}``.

Nothing here touches the disk: :func:`validate_feature_collection` turns untrusted input into a new,
normalised dict or raises :class:`~colabel.errors.InvalidInputError`; :func:`rasterize` and
:func:`label_properties` read a validated collection.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from colabel.coords import xy_to_rc
from colabel.errors import InvalidInputError, shown
from colabel.scanline import edge_rows, ring_areas, rings_pixels

from .models import LabelClass

__all__ = [
    "OBJECT_TYPES",
    "MAX_UINT16_LABEL",
    "MAX_PROPERTY_DEPTH",
    "MAX_PROPERTY_VALUES",
    "validate_feature_collection",
    "check_raster_cost",
    "rasterize",
    "label_properties",
]

#: QuPath object types that ``properties.objectType`` may take.
OBJECT_TYPES = ("annotation", "detection", "cell", "tile")

#: The largest label :func:`rasterize` stores as uint16; more polygon features switch to uint32.
MAX_UINT16_LABEL = 65535

#: Integer feature ids beyond this are refused: JavaScript and many JSON readers lose their digits.
MAX_EXACT_INT = 2**53

#: Vertices may lie this far (pixels) outside ``[0, W] x [0, H]`` before they are refused.
BOUNDS_TOLERANCE = 1e-6

#: Most vertices one ring may have (a cell outline has tens to hundreds, a traced tissue region thousands).
#: This limit and the next two are checked on the raw coordinate lists, before any geometry is built.
MAX_RING_VERTICES = 100_000

#: Most vertices one feature geometry may have in all its rings (a Polygon's holes, a MultiPolygon's parts).
MAX_GEOMETRY_VERTICES = 2**18

#: Most polygon vertices one annotation may have in all: 100,000 nuclei of 40 vertices.
MAX_VERTICES = 2**22

#: Most outline overlap (:func:`_outline_overlap`) the polygons of one annotation may have in all; it bounds the
#: time their validity checks take (here about 1 s at the limit). Real outlines have about 5 per vertex, at
#: most about 15 (16 * MAX_VERTICES is the limit); an outline that zigzags back and forth across the same place
#: thousands of times has hundreds of millions.
MAX_OUTLINE_OVERLAP = 2**26

#: Most levels of nesting a feature's ``properties`` may have, the properties object itself counting as one: QuPath
#: writes 3 at most (``{"classification": {"color": [...]}}``, ``{"measurements": {...}}``). Checked, with the next
#: limit, before the properties are copied: stored versions are written compactly, but deep nesting would still
#: cost the provider memory and every reader of the version time.
MAX_PROPERTY_DEPTH = 8

#: Most values one feature's ``properties`` may hold, counting every entry of every object and list in them at any
#: level (``objectType`` and ``classification`` aside): a QuPath cell has tens to a few hundred measurements.
MAX_PROPERTY_VALUES = 10_000

_POLYGONAL = ("Polygon", "MultiPolygon")
_GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "Point")


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


class _Refusal(Exception):
    """Internal: a problem found inside one feature; the caller adds the feature index."""


class _Budget:
    """What one annotation has spent of :data:`MAX_VERTICES` and :data:`MAX_OUTLINE_OVERLAP`, and the current
    feature geometry of :data:`MAX_GEOMETRY_VERTICES`; each ``take_*`` raises :class:`_Refusal` past a limit."""

    def __init__(self) -> None:
        self.vertices = 0
        self.overlap = 0
        self.geometry = "geometry"
        self.geometry_vertices = 0

    def start_geometry(self, key: str) -> None:
        self.geometry, self.geometry_vertices = key, 0

    def take_ring(self, n: int, *, what: str) -> None:
        """Count a ring of *n* vertices, before its coordinates are even read."""
        if n > MAX_RING_VERTICES:
            raise _Refusal(f"{what} has {n} vertices, more than the limit of {MAX_RING_VERTICES}")
        self.geometry_vertices += n
        if self.geometry_vertices > MAX_GEOMETRY_VERTICES:
            raise _Refusal(
                f"{self.geometry} has more than the limit of {MAX_GEOMETRY_VERTICES} vertices in all its rings "
                "(split it into several features)"
            )
        self.vertices += n
        if self.vertices > MAX_VERTICES:
            raise _Refusal(f"the annotation has more than the limit of {MAX_VERTICES} polygon vertices in all")

    def take_overlap(self, polygons: list[list[np.ndarray]], *, what: str) -> None:
        """Count the outline overlap of *polygons* (lists of closed rings), before their validity is checked."""
        if sum(len(ring) for rings in polygons for ring in rings) <= _UNCOUNTED_VERTICES:
            return
        left = MAX_OUTLINE_OVERLAP - self.overlap
        overlap = _outline_overlap(polygons, limit=left)
        if overlap > left:
            raise _Refusal(
                f"{what} is too convoluted to check: its outline runs back and forth over the same places so "
                f"often that the annotation's outline overlap passes the limit of {MAX_OUTLINE_OVERLAP}"
            )
        self.overlap += overlap


def _is_number(value: Any) -> bool:
    # bool is an int subclass; JSON true/false are not coordinates
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _position(value: Any, *, height: int, width: int) -> list[float]:
    """Return ``[x, y]`` as floats after checking shape, finiteness and image bounds."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Refusal(f"expected an [x, y] position, got {_short(value)} (wrong nesting of coordinates?)")
    x, y = value
    if not (_is_number(x) and _is_number(y)):
        raise _Refusal(f"coordinates must be numbers, got {_short(value)}")
    try:
        x, y = float(x), float(y)
    except OverflowError:  # an integer beyond float's range
        raise _Refusal(f"coordinates must be finite numbers, got {_short(value)}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise _Refusal(f"coordinates must be finite numbers, got [{x}, {y}]")
    tol = BOUNDS_TOLERANCE
    if not (-tol <= x <= width + tol and -tol <= y <= height + tol):
        raise _Refusal(
            f"vertex [{x:g}, {y:g}] lies outside the image (x must be in [0, {width}], y in [0, {height}])"
        )
    return [x, y]


def _ring(value: Any, *, what: str, height: int, width: int, budget: _Budget) -> np.ndarray:
    """Return a closed ring as a new float64 ``(N, 2)`` ``[x, y]`` array, or raise :class:`_Refusal`."""
    if not isinstance(value, (list, tuple)):
        raise _Refusal(f"{what} must be a list of [x, y] positions, got {_short(value)}")
    budget.take_ring(len(value), what=what)
    ring = _fast_ring(value, height=height, width=width)
    if ring is None:  # something is wrong or unusual: check position by position for a precise message
        ring = np.array([_position(p, height=height, width=width) for p in value], dtype=np.float64)
    n_distinct = len(set(map(tuple, ring.tolist())))
    if n_distinct < 3:
        raise _Refusal(f"{what} has {n_distinct} distinct vertices, at least 3 are needed")
    if (ring[0] != ring[-1]).any():
        ring = np.concatenate([ring, ring[:1]])
    x, y = ring[:, 0], ring[:, 1]
    signed_area = 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    # A ring of zero signed area is invalid: with all its vertices on one line it encloses nothing; otherwise
    # it crosses or touches itself (a bow tie's two loops cancel), which _check_valid reports. Nothing is
    # repaired to tell the two apart: shapely.make_valid's time grows with the crossings, not the size.
    if signed_area == 0 and _on_one_line(ring):
        raise _Refusal(f"{what} is empty (zero area)")
    return ring


def _on_one_line(ring: np.ndarray) -> bool:
    """Whether every vertex of *ring* lies on the line through its first vertex and the one farthest away."""
    d = ring - ring[0]
    far = d[np.argmax(np.abs(d).sum(axis=1))]
    return not (far[0] * d[:, 1] - far[1] * d[:, 0]).any()


def _fast_ring(value: list | tuple, *, height: int, width: int) -> np.ndarray | None:
    """Vectorised check of a list of ``[x, y]`` numbers: the float64 array when all is well, else None."""
    try:
        ring = np.array(value)
    except (ValueError, TypeError):  # ragged nesting
        return None
    if ring.ndim != 2 or ring.shape[1] != 2 or ring.dtype.kind not in "iuf":
        return None
    if any(type(v) is bool for p in value for v in p):  # numpy silently turns True into 1
        return None
    ring = ring.astype(np.float64)
    tol = BOUNDS_TOLERANCE
    x, y = ring[:, 0], ring[:, 1]
    ok = np.isfinite(ring).all() and (x >= -tol).all() and (x <= width + tol).all()
    ok = ok and (y >= -tol).all() and (y <= height + tol).all()
    return ring if ok else None


def _polygon_rings(
    value: Any, *, what: str, height: int, width: int, budget: _Budget, check: bool = True
) -> tuple[list[np.ndarray], Polygon]:
    """Validate Polygon coordinates (a shell then holes); return closed float rings and the polygon. Without
    ``check`` (a MultiPolygon's part, charged and checked with the whole), the outline overlap is not charged and
    the polygon's validity not checked."""
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise _Refusal(f"{what} coordinates must be a non-empty list of rings, got {_short(value)}")
    rings = []
    for i, ring in enumerate(value):
        name = f"{what} shell" if i == 0 else f"{what} hole {i}"
        rings.append(_ring(ring, what=name, height=height, width=width, budget=budget))
    if check:
        budget.take_overlap([rings], what=what)
    holes = [shapely.linearrings(h) for h in rings[1:]] or None
    geometry = shapely.polygons(rings[0], holes=holes)
    if check:
        _check_valid(geometry, what=what)
    return rings, geometry


def _check_valid(geometry: Polygon | MultiPolygon, *, what: str) -> None:
    """Refuse an invalid geometry with shapely's reason; its cost is bounded by :meth:`_Budget.take_overlap`."""
    reason = shapely.is_valid_reason(geometry)
    if reason == "Valid Geometry":
        return
    if isinstance(geometry, MultiPolygon):
        raise _Refusal(f"{what} parts overlap or cross ({reason})")
    if reason.startswith("Hole lies outside shell"):
        raise _Refusal(f"{what} has a hole outside its shell ({reason})")
    if "Self-intersection" in reason:
        raise _Refusal(f"{what} is self-intersecting ({reason})")
    raise _Refusal(f"{what} is invalid ({reason})")


#: Candidate pairs one spatial-index query of :func:`_overlap_weight` may return (memory: 16 bytes each).
_QUERY_PAIRS = 2**21

#: The outline overlap of a geometry of at most this many vertices is not counted: it is below 64 per vertex,
#: at most about a microsecond per vertex to check, less than reading the vertices takes.
_UNCOUNTED_VERTICES = 64


def _outline_overlap(polygons: list[list[np.ndarray]], *, limit: int) -> int:
    """How much work checking the validity of *polygons* (lists of closed ``[x, y]`` rings) can take.

    GEOS looks for crossings between the monotone chains of the outlines (runs of segments heading into the
    same quadrant), comparing every two chains whose bounding boxes overlap, at a cost that grows with their
    segments; it then compares holes (and the parts of a MultiPolygon) whose bounding boxes overlap, at a cost
    that grows with their vertices. The outline overlap sums, over every such pair, the segments (vertices) of
    both: a few per vertex for real outlines, quadratic in the vertices for one that zigzags back and forth
    over the same place. Counting it takes time about linear in the vertices, plus the pairs counted; the
    count stops early once it passes *limit* (it is then only known to be more).
    """
    boxes, sizes = _chain_boxes([ring for rings in polygons for ring in rings])
    total = _overlap_weight(boxes, sizes, limit=limit)
    for rings in polygons:
        if len(rings) > 2 and total <= limit:  # holes are compared with holes
            holes = rings[1:]
            boxes = np.array([[*h.min(axis=0), *h.max(axis=0)] for h in holes])
            total += _overlap_weight(boxes, np.array([len(h) for h in holes]), limit=limit - total)
    if len(polygons) > 1 and total <= limit:  # the parts of a MultiPolygon are compared with each other
        boxes = np.array([[*rings[0].min(axis=0), *rings[0].max(axis=0)] for rings in polygons])
        sizes = np.array([sum(len(r) for r in rings) for rings in polygons])
        total += _overlap_weight(boxes, sizes, limit=limit - total)
    return total


def _chain_boxes(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes ``(xmin, ymin, xmax, ymax)`` and segment counts of the monotone chains of closed rings,
    split as GEOS splits them: where a segment heads into another quadrant, zero-length segments skipped."""
    points = np.concatenate(rings) if len(rings) > 1 else rings[0]
    step = np.diff(points, axis=0)
    moving = step.any(axis=1)
    if len(rings) > 1:
        starts = np.cumsum([len(r) for r in rings])[:-1]  # where each ring after the first begins in points
        moving[starts - 1] = False  # no segment from one ring's last vertex to the next ring's first
    index = np.flatnonzero(moving)
    if index.size == 0:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    heading = (step[index] < 0) @ np.array([2, 1])  # the quadrant: 0 to 3 for (dx < 0, dy < 0)
    if len(rings) > 1:
        heading += 4 * np.searchsorted(starts, index, side="right")  # and the ring
    change = np.empty(index.size, dtype=bool)
    change[0] = True
    np.not_equal(heading[1:], heading[:-1], out=change[1:])
    first = np.flatnonzero(change)
    end = np.append(first[1:], index.size)
    # a monotone chain lies within the box of its two ends
    p, q = points[index[first]], points[index[end - 1] + 1]
    return np.concatenate([np.minimum(p, q), np.maximum(p, q)], axis=1), end - first


def _overlap_weight(boxes: np.ndarray, sizes: np.ndarray, *, limit: int) -> int:
    """Sum over every two boxes that overlap (closed) of their two sizes; past *limit*, some sum above it.

    An upper bound comes first, from how many boxes each one overlaps along x and along y (sorting only);
    when that is not already small, the pairs are counted with a spatial index, a bounded number at a time,
    stopping once past *limit*.
    """
    n = len(boxes)
    if n < 2:
        return 0
    sizes = np.asarray(sizes, dtype=np.int64)
    degree = np.minimum(_overlaps_1d(boxes[:, 0], boxes[:, 2]), _overlaps_1d(boxes[:, 1], boxes[:, 3]))
    bound = int(sizes @ degree)
    if bound <= 4 * int(sizes.sum()) + 4096:  # small already: as for real outlines
        return bound
    lines = shapely.linestrings(boxes.reshape(n, 2, 2))  # each box's diagonal: the same bounding box
    tree = shapely.STRtree(lines)
    ends = np.cumsum(degree + 1)  # candidate pairs returned by the queries of boxes 0..k
    total = start = 0
    while start < n and total <= limit:
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - degree[start] - 1 + _QUERY_PAIRS, "right")))
        query, found = tree.query(lines[start:stop])
        query += start
        total += int(sizes[query[query != found]].sum())  # each pair is found from both sides
        start = stop
    return total


def _overlaps_1d(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """For each closed interval ``[low, high]``, how many of the others it overlaps."""
    return np.searchsorted(np.sort(low), high, "right") - np.searchsorted(np.sort(high), low, "left") - 1


def _geometry(value: Any, *, key: str, allowed: Sequence[str], height: int, width: int, budget: _Budget) -> dict:
    """Validate one GeoJSON geometry object; return a new normalised one."""
    if not isinstance(value, dict):
        raise _Refusal(f"{key} must be a GeoJSON geometry object, got {_short(value)}")
    kind = value.get("type")
    if kind not in allowed:
        raise _Refusal(f"{key} type {_short(kind)} is not supported (allowed: {', '.join(allowed)})")
    if "coordinates" not in value:
        raise _Refusal(f"{key} has no coordinates")
    coords = value["coordinates"]
    if kind == "Point":
        return {"type": "Point", "coordinates": _position(coords, height=height, width=width)}
    budget.start_geometry(key)
    if kind == "Polygon":
        rings, _ = _polygon_rings(coords, what="polygon", height=height, width=width, budget=budget)
        return {"type": "Polygon", "coordinates": [r.tolist() for r in rings]}
    # MultiPolygon
    if not isinstance(coords, (list, tuple)) or len(coords) == 0:
        raise _Refusal(f"MultiPolygon coordinates must be a non-empty list of polygons, got {_short(coords)}")
    parts = [
        _polygon_rings(part, what=f"MultiPolygon part {i}", height=height, width=width, budget=budget, check=False)
        for i, part in enumerate(coords)
    ]
    # charged once for the whole (its count holds each part's own pairs), which bounds the parts' checks too
    budget.take_overlap([rings for rings, _ in parts], what="MultiPolygon")
    for i, (_, geometry) in enumerate(parts):
        _check_valid(geometry, what=f"MultiPolygon part {i}")
    _check_valid(shapely.multipolygons([geometry for _, geometry in parts]), what="MultiPolygon")
    return {"type": "MultiPolygon", "coordinates": [[r.tolist() for r in rings] for rings, _ in parts]}


def _classification(value: Any, *, classes: dict[str, LabelClass] | None) -> dict:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise _Refusal(f"classification must be an object with a name or a string, got {_short(value)}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise _Refusal(f"classification name must be a non-empty string, got {_short(name)}")
    if classes is not None:
        if name not in classes:
            allowed = ", ".join(repr(n) for n in classes) or "none"
            raise _Refusal(f"class {_short(name)} is not a class of this session (allowed: {allowed})")
        return {"name": name, "color": classes[name].rgb()}
    color = value.get("color")
    if (
        isinstance(color, (list, tuple))
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        return {"name": name, "color": [int(c) for c in color]}
    return {"name": name}


def _check_property_shape(rest: dict) -> None:
    """Refuse properties nested deeper than :data:`MAX_PROPERTY_DEPTH` levels or holding more than
    :data:`MAX_PROPERTY_VALUES` values, walking them without recursion and never past either limit (a list of a
    million values is refused from its length, a thousand levels deep from the first nine)."""
    count = len(rest)
    if count > MAX_PROPERTY_VALUES:
        raise _Refusal(f"properties hold {count} values, more than the limit of {MAX_PROPERTY_VALUES}")
    stack = [(v, 2, k) for k, v in rest.items()]  # (value, its level if a container, the top-level key it is in)
    while stack:
        item, level, key = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if level > MAX_PROPERTY_DEPTH:
            raise _Refusal(f"properties are nested too deeply: property {_short(key, 40)} goes more than "
                           f"{MAX_PROPERTY_DEPTH} levels deep (the properties object counting as one), the limit is "
                           f"{MAX_PROPERTY_DEPTH}")
        count += len(children)
        if count > MAX_PROPERTY_VALUES:
            raise _Refusal(f"properties hold more than the limit of {MAX_PROPERTY_VALUES} values (every entry of "
                           f"every object and list in them counts; property {_short(key, 40)} passes it)")
        stack.extend((child, level + 1, key) for child in children)


def _properties(value: Any, *, classes: dict[str, LabelClass] | None) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _Refusal(f"properties must be an object, got {_short(value)}")
    rest = {k: v for k, v in value.items() if k not in ("objectType", "classification")}
    _check_property_shape(rest)
    try:
        # the round trip both checks serialisability and copies: the output shares nothing with the input
        out = json.loads(json.dumps(rest, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise _Refusal(f"properties must be JSON-serialisable ({exc})") from None
    object_type = value.get("objectType", "annotation")
    if object_type not in OBJECT_TYPES:
        raise _Refusal(f"objectType {_short(object_type)} is not one of {', '.join(OBJECT_TYPES)}")
    out["objectType"] = object_type
    if value.get("classification") is not None:
        out["classification"] = _classification(value["classification"], classes=classes)
    return out


def _feature(
    value: Any, *, classes: dict[str, LabelClass] | None, height: int, width: int, budget: _Budget
) -> dict:
    if not isinstance(value, dict):
        raise _Refusal(f"must be a GeoJSON Feature object, got {_short(value)}")
    if value.get("type") != "Feature":
        raise _Refusal(f"type must be 'Feature', got {_short(value.get('type'))}")
    if value.get("geometry") is None:
        raise _Refusal("has no geometry")
    fid = value.get("id")
    if not (isinstance(fid, str) or (isinstance(fid, int) and not isinstance(fid, bool))):
        fid = str(uuid.uuid4())
    elif isinstance(fid, int) and abs(fid) > MAX_EXACT_INT:
        raise _Refusal(f"an integer id must lie within +-2**53 (exact in JSON readers), got {_short(fid)}")
    out = {
        "type": "Feature",
        "id": fid,
        "geometry": _geometry(
            value["geometry"], key="geometry", allowed=_GEOMETRY_TYPES, height=height, width=width, budget=budget
        ),
        "properties": _properties(value.get("properties"), classes=classes),
    }
    if value.get("nucleusGeometry") is not None:  # QuPath cells carry their nucleus here
        out["nucleusGeometry"] = _geometry(
            value["nucleusGeometry"], key="nucleusGeometry", allowed=_POLYGONAL, height=height, width=width,
            budget=budget,
        )
    return out


def _short(value: Any, limit: int = 60) -> str:
    return shown(value, limit)


def validate_feature_collection(
    obj: dict | str | bytes,
    *,
    image_shape: tuple[int, int],
    classes: Sequence[LabelClass] | None = None,
    max_features: int = 100_000,
) -> dict:
    """Check an annotator's GeoJSON and return a new, normalised FeatureCollection.

    Parameters
    ----------
    obj : dict or str or bytes
        A GeoJSON ``FeatureCollection`` as a dict, or its JSON text. Coordinates are ``[x, y]`` pixels
        of the full-resolution image (``x`` = column, ``y`` = row, ``y`` down, origin at the top-left
        corner of the top-left pixel). Not mutated.
    image_shape : tuple of 2 int
        ``(height, width)`` of the image in pixels. Every vertex and point must satisfy
        ``0 <= x <= width`` and ``0 <= y <= height`` (up to ``1e-6``).
    classes : sequence of LabelClass, optional
        The session's classes. When given, every classification name must be one of them and its colour
        is taken from the class.
    max_features : int, default 100_000
        The most features accepted.

    Returns
    -------
    fc : dict
        ``{"type": "FeatureCollection", "features": [...]}``, sharing no mutable object with *obj*.
        Each feature is ``{"type": "Feature", "id", "geometry", "properties"}`` (plus a validated
        ``nucleusGeometry`` when given, as QuPath writes for cells) where

        * geometry is a ``Polygon``, ``MultiPolygon`` or ``Point`` with float coordinates and closed
          rings (the first vertex appended when a ring was open);
        * ``id`` is the given string or int id, else a new uuid4 string;
        * ``properties.objectType`` is one of :data:`OBJECT_TYPES`, ``"annotation"`` by default;
        * ``properties.classification``, when given, is ``{"name": str, "color": [r, g, b]}`` (QuPath's
          string shorthand is accepted); the colour comes from *classes* when given, else a valid given
          ``[r, g, b]`` of ints in 0..255 is kept and anything else is dropped;
        * other properties are kept (deep-copied through JSON).

        Other top-level keys of the collection and of features are dropped.

    Raises
    ------
    InvalidInputError
        With one sentence naming the problem and, for a bad feature, its 0-based index: not JSON, not a
        FeatureCollection, too many features, a feature that is not a Feature or has no geometry, an
        unsupported geometry type, coordinates that are not finite numbers or wrongly nested, a ring
        with fewer than 3 distinct vertices or zero area (all its vertices on one line), an invalid
        polygon (self-intersection, hole outside its shell, ... as explained by shapely), a vertex outside
        the image, a bad classification or objectType, properties that are not a JSON-serialisable
        object, nest deeper than :data:`MAX_PROPERTY_DEPTH` levels or hold more than
        :data:`MAX_PROPERTY_VALUES` values. Before any geometry is checked: more vertices than
        :data:`MAX_RING_VERTICES` in a ring, :data:`MAX_GEOMETRY_VERTICES` in a geometry or
        :data:`MAX_VERTICES` in all, or outlines too
        convoluted to check (more than :data:`MAX_OUTLINE_OVERLAP` in all). The time taken is about
        linear in the size of *obj*, whatever its shapes.

    Examples
    --------
    >>> fc = validate_feature_collection(
    ...     {"type": "FeatureCollection", "features": [{"type": "Feature", "id": "a",
    ...       "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2]]]}}]},
    ...     image_shape=(4, 4))
    >>> fc["features"][0]["geometry"]["coordinates"][0][-1], fc["features"][0]["properties"]
    ([0.0, 0.0], {'objectType': 'annotation'})
    """
    height, width = (int(n) for n in image_shape)
    if isinstance(obj, (bytes, bytearray)):
        try:
            obj = obj.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"annotations are not UTF-8 text: {exc}") from None
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except (ValueError, RecursionError) as exc:  # bad JSON, a number of over 4300 digits, deep nesting
            raise InvalidInputError(f"annotations are not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"annotations must be a GeoJSON FeatureCollection object, got {type(obj).__name__}")
    if obj.get("type") != "FeatureCollection":
        raise InvalidInputError(f"annotations type must be 'FeatureCollection', got {_short(obj.get('type'))}")
    features = obj.get("features")
    if not isinstance(features, list):
        raise InvalidInputError(f"'features' must be a list, got {type(features).__name__}")
    if len(features) > max_features:
        raise InvalidInputError(f"{len(features)} features is more than the limit of {max_features}")
    by_name = None if classes is None else {c.name: c for c in classes}
    budget = _Budget()
    out = []
    for index, feature in enumerate(features):
        try:
            out.append(_feature(feature, classes=by_name, height=height, width=width, budget=budget))
        except _Refusal as exc:
            raise InvalidInputError(f"feature {index}: {exc}") from None
        except RecursionError:
            raise InvalidInputError(f"feature {index}: nested too deeply") from None
    return {"type": "FeatureCollection", "features": out}


# --------------------------------------------------------------------------------------------------
# rasterisation and per-object properties
# --------------------------------------------------------------------------------------------------


def _polygonal_features(fc: dict) -> list[dict]:
    """The Polygon/MultiPolygon features of *fc*, in order; label ``k`` is ``index + 1``."""
    if not isinstance(fc, dict) or not isinstance(fc.get("features"), list):
        raise InvalidInputError("expected a FeatureCollection dict with a 'features' list")
    out = []
    for index, feature in enumerate(fc["features"]):
        kind = (feature.get("geometry") or {}).get("type")
        if kind in _POLYGONAL:
            out.append(feature)
        elif kind != "Point":
            raise InvalidInputError(f"feature {index}: geometry type {_short(kind)} cannot be rasterised")
    return out


#: Most (edge, pixel row) pairs the polygons of one annotation may cross in all: the cost of rasterising
#: them (:func:`colabel.scanline.edge_rows`). 100 000 nuclei 40 px tall cross about 8 million.
MAX_EDGE_ROWS = 2**23

#: The polygons of one annotation may cover at most this many times the image's area in all (plus
#: :data:`AREA_ALLOWANCE` pixels): overlapping regions, a tissue outline around its cells, are fine.
MAX_COVERAGE = 8
AREA_ALLOWANCE = 2**20


class _Rings:
    """Every ring of the polygon features, concatenated (see :mod:`colabel.scanline`) as ``(row, col)`` of
    pixel centres: pixel ``(r, c)`` has its centre at ``(x, y) = (c + 0.5, r + 0.5)``.

    ``label[k]`` is ring ``k``'s feature label (1-based, in order), ``part[k]`` its polygon's number over
    all features, ``hole[k]`` whether it is a hole of that polygon.
    """

    def __init__(self, fc: dict):
        label, part, hole, lengths, points = [], [], [], [], []
        n_parts = 0
        features = _polygonal_features(fc)
        for k, feature in enumerate(features, start=1):
            geometry = feature["geometry"]
            polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
            for polygon in polygons:
                for i, ring in enumerate(polygon):
                    label.append(k)
                    part.append(n_parts)
                    hole.append(i > 0)
                    lengths.append(len(ring))
                    points.extend(ring)
                n_parts += 1
        self.n_features = len(features)
        self.label = np.asarray(label, dtype=np.int64)
        self.part = np.asarray(part, dtype=np.int64)
        self.hole = np.asarray(hole, dtype=bool)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else \
            np.zeros(0, dtype=np.int64)
        rc = xy_to_rc(np.asarray(points, dtype=np.float64).reshape(-1, 2)) - 0.5
        self.rows, self.cols = rc[:, 0], rc[:, 1]


def check_raster_cost(fc: dict, *, shape: tuple[int, int]) -> None:
    """Refuse a collection whose polygons would take unreasonably long to draw.

    The cost of :func:`rasterize` is the pixel rows its outlines cross plus the pixels it fills; both are
    bounded here (:data:`MAX_EDGE_ROWS`; :data:`MAX_COVERAGE` times the image plus :data:`AREA_ALLOWANCE`
    pixels) from the vertices alone, before anything is drawn.

    Raises
    ------
    InvalidInputError
        Naming the figure over its limit.
    """
    _check_cost(_Rings(fc), shape)


def _check_cost(rings: _Rings, shape: tuple[int, int]) -> None:
    height, width = (int(n) for n in shape)
    rows = edge_rows(rings.rows.clip(-1, height), rings.starts)
    if rows > MAX_EDGE_ROWS:
        raise InvalidInputError(
            f"annotation too complex to store: its outlines cross {rows} pixel rows in all, more than the "
            f"limit of {MAX_EDGE_ROWS}"
        )
    area = float(np.abs(ring_areas(rings.rows, rings.cols, rings.starts)).sum())
    if area > MAX_COVERAGE * height * width + AREA_ALLOWANCE:
        raise InvalidInputError(
            f"annotation too large to store: its polygons cover {area / (height * width):.1f} times the image's "
            f"area in all, more than the limit of {MAX_COVERAGE}"
        )


def rasterize(fc: dict, *, shape: tuple[int, int]) -> np.ndarray:
    """Draw the polygon features of a FeatureCollection as an instance-label image.

    Parameters
    ----------
    fc : dict
        A FeatureCollection as returned by :func:`validate_feature_collection` (``[x, y]`` pixel
        coordinates, ``y`` down). Not mutated.
    shape : tuple of 2 int
        ``(height, width)`` of the output.

    Returns
    -------
    labels : ndarray, shape (height, width), uint16 or uint32
        0 is background; label ``k`` is the ``k``-th (1-based) Polygon or MultiPolygon feature in order
        (Point features are not drawn and take no label). A pixel ``(r, c)`` belongs to a polygon when
        its centre ``(x, y) = (c + 0.5, r + 0.5)`` lies inside it (a centre exactly on the boundary
        counts as inside, as in ``skimage.draw.polygon``). Later features overwrite earlier ones
        where they overlap; a feature leaves its holes untouched (earlier features or background show
        through); the parts of a MultiPolygon share one label. The dtype is uint16, or uint32 when there
        are more than :data:`MAX_UINT16_LABEL` polygon features.

    Raises
    ------
    InvalidInputError
        When the polygons are too costly to draw (:func:`check_raster_cost`).

    Notes
    -----
    Scanline filling (:func:`colabel.scanline.polygon_pixels`): the time is proportional to the rows the
    outlines cross and the pixels filled, not to bounding boxes times vertices.

    Examples
    --------
    >>> fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry":
    ...       {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]}}]}
    >>> rasterize(fc, shape=(3, 3))
    array([[1, 1, 0],
           [1, 1, 0],
           [0, 0, 0]], dtype=uint16)
    """
    height, width = (int(n) for n in shape)
    rings = _Rings(fc)
    _check_cost(rings, (height, width))
    dtype = np.uint16 if rings.n_features <= MAX_UINT16_LABEL else np.uint32
    labels = np.zeros((height, width), dtype=dtype)
    ring, index = rings_pixels(rings.rows, rings.cols, rings.starts, (height, width))
    if rings.hole.any():  # a polygon's pixels are its shell's minus its holes' (their boundaries included)
        part_key = rings.part[ring] * (height * width) + index
        in_hole = rings.hole[ring]
        keep = ~in_hole & ~np.isin(part_key, part_key[in_hole])
        ring, index = ring[keep], index[keep]
    # where features overlap, the later one (larger label) is drawn
    np.maximum.at(labels.reshape(-1), index, rings.label[ring].astype(dtype))
    return labels


def label_properties(fc: dict) -> list[dict]:
    """Per-object properties of the polygon features, matching the labels of :func:`rasterize`.

    Parameters
    ----------
    fc : dict
        A validated FeatureCollection (``[x, y]`` pixel coordinates, ``y`` down). Not mutated.

    Returns
    -------
    props : list of dict
        One dict per Polygon/MultiPolygon feature, in label order, with

        * ``label`` (int): the label :func:`rasterize` gives it (1-based);
        * ``feature_id`` (str, int or None): the feature's ``id``;
        * ``class_name`` (str or None): ``properties.classification.name``;
        * ``area`` (float): the exact polygon area in pixels² (holes subtracted), from shapely; it can
          differ from the rasterised pixel count by about half the perimeter;
        * ``centroid`` (list of 2 float): ``[x, y]``;
        * ``bbox`` (list of 4 float): ``[xmin, ymin, xmax, ymax]``.

    Examples
    --------
    >>> fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "id": "a", "geometry":
    ...       {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]}}]}
    >>> label_properties(fc)
    [{'label': 1, 'feature_id': 'a', 'class_name': None, 'area': 4.0, 'centroid': [1.0, 1.0], \
'bbox': [0.0, 0.0, 2.0, 2.0]}]
    """
    out = []
    for label, feature in enumerate(_polygonal_features(fc), start=1):
        geometry = shape(feature["geometry"])
        classification = (feature.get("properties") or {}).get("classification")
        if isinstance(classification, str):
            class_name = classification
        elif isinstance(classification, dict):
            class_name = classification.get("name")
        else:
            class_name = None
        centroid = shapely.centroid(geometry)
        out.append(
            {
                "label": label,
                "feature_id": feature.get("id"),
                "class_name": class_name,
                "area": float(geometry.area),
                "centroid": [float(centroid.x), float(centroid.y)],
                "bbox": [float(v) for v in geometry.bounds],
            }
        )
    return out
