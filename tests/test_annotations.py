"""apps/provider/annotations.py: validation, normalisation and rasterisation of QuPath GeoJSON."""

from __future__ import annotations

import copy
import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from colabel.apps.provider import annotations
from colabel.apps.provider.annotations import label_properties, rasterize, validate_feature_collection
from colabel.apps.provider.models import LabelClass
from colabel.coords import rc_to_xy
from colabel.errors import InvalidInputError

pytestmark = pytest.mark.unit

SHAPE = (20, 30)  # (height, width)
NUCLEI_MASK = Path(__file__).parent / "data" / "dsb2018_nuclei_mask.tif"


def square(x0, y0, x1, y1, *, closed=True):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    return ring + [[x0, y0]] if closed else ring


def feature(geometry, **extra):
    return {"type": "Feature", "geometry": geometry, **extra}


def polygon(*rings):
    return {"type": "Polygon", "coordinates": list(rings)}


def fc_of(*features):
    return {"type": "FeatureCollection", "features": list(features)}


def validate(*features, classes=None, shape=SHAPE, **kwargs):
    return validate_feature_collection(fc_of(*features), image_shape=shape, classes=classes, **kwargs)


def refused(*features, match, classes=None, shape=SHAPE):
    with pytest.raises(InvalidInputError, match=match):
        validate(*features, classes=classes, shape=shape)


GOOD = feature(polygon(square(1, 1, 5, 5)))
CLASSES = [LabelClass(name="nucleus", color="#FF0000"), LabelClass(name="stroma", color="#00ff80")]


# ------------------------------------------------------------------------------------------------
# refusals of the collection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [[], 3, None, ["FeatureCollection"]])
def test_non_dict_collection_is_refused(obj):
    with pytest.raises(InvalidInputError, match="must be a GeoJSON FeatureCollection object"):
        validate_feature_collection(obj, image_shape=SHAPE)


def test_json_text_that_does_not_parse_is_refused():
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        validate_feature_collection('{"type": "FeatureCollection", "features": [', image_shape=SHAPE)


@pytest.mark.parametrize(("text", "why"), [
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", '
     '"coordinates": [' + "1" * 5000 + ', 0]}}]}', "4300 digits"),
    ("[" * 100_000, "recursion"),
])
def test_json_text_python_cannot_hold_is_refused_as_bad_json(text, why):
    with pytest.raises(InvalidInputError, match=f"not valid JSON: .*{why}"):
        validate_feature_collection(text, image_shape=SHAPE)


def test_numbers_and_nesting_beyond_what_json_readers_hold_are_refused_not_crashed():
    refused(feature(polygon([[0, 0], [10**400, 0], [3, 3]])), match="feature 0: coordinates must be finite")
    refused(feature({"type": "Point", "coordinates": [10**5000, 0]}), match="finite numbers, got a value too large")
    refused(feature(polygon(square(1, 1, 5, 5)), id=2**53 + 1), match="integer id must lie within")
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    refused(feature(polygon(square(1, 1, 5, 5)), properties=deep), match="feature 0: properties are nested too deeply")
    assert validate(feature(polygon(square(1, 1, 5, 5)), id=2**53))["features"][0]["id"] == 2**53


def test_json_text_and_bytes_are_parsed():
    text = json.dumps(fc_of(GOOD))
    for obj in (text, text.encode()):
        out = validate_feature_collection(obj, image_shape=SHAPE)
        assert out["features"][0]["geometry"]["type"] == "Polygon"


def test_wrong_collection_type_is_refused():
    with pytest.raises(InvalidInputError, match="type must be 'FeatureCollection', got 'Feature'"):
        validate_feature_collection(GOOD, image_shape=SHAPE)


def test_features_that_are_not_a_list_is_refused():
    with pytest.raises(InvalidInputError, match="'features' must be a list, got dict"):
        validate_feature_collection({"type": "FeatureCollection", "features": {}}, image_shape=SHAPE)


def test_more_features_than_the_limit_are_refused():
    with pytest.raises(InvalidInputError, match="3 features is more than the limit of 2"):
        validate(GOOD, GOOD, GOOD, max_features=2)


# ------------------------------------------------------------------------------------------------
# refusals of one feature, always naming its index
# ------------------------------------------------------------------------------------------------


def test_non_dict_feature_is_refused_with_feature_index():
    refused(GOOD, "polygon", match=r"^feature 1: must be a GeoJSON Feature object")


def test_wrong_feature_type_is_refused_with_feature_index():
    refused(GOOD, GOOD, {"type": "Polygon", "geometry": GOOD["geometry"]}, match=r"^feature 2: type must be 'Feature'")


@pytest.mark.parametrize("bad", [{"type": "Feature"}, {"type": "Feature", "geometry": None}])
def test_feature_without_geometry_is_refused_with_feature_index(bad):
    refused(bad, match=r"^feature 0: has no geometry")


@pytest.mark.parametrize(
    "geometry",
    [
        {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
        {"type": "MultiPoint", "coordinates": [[0, 0]]},
        {"type": "GeometryCollection", "geometries": []},
        {"type": "polygon", "coordinates": [square(1, 1, 2, 2)]},
    ],
)
def test_unsupported_geometry_type_is_refused(geometry):
    refused(
        feature(geometry),
        match=r"^feature 0: geometry type .* is not supported \(allowed: Polygon, MultiPolygon, Point\)",
    )


def test_geometry_without_coordinates_is_refused():
    refused(feature({"type": "Polygon"}), match="^feature 0: geometry has no coordinates")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_coordinates_are_refused(bad):
    ring = square(1, 1, 5, 5)
    ring[2] = [bad, 5]
    refused(feature(polygon(ring)), match="^feature 0: coordinates must be finite numbers")


@pytest.mark.parametrize("bad", ["3", True, None, [1]])
def test_non_numeric_coordinates_are_refused(bad):
    ring = square(1, 1, 5, 5)
    ring[1] = [bad, 1]
    refused(feature(polygon(ring)), match=r"^feature 0: coordinates must be numbers")


def test_point_with_boolean_coordinates_is_refused():
    refused(feature({"type": "Point", "coordinates": [True, 1]}), match="^feature 0: coordinates must be numbers")


@pytest.mark.parametrize(
    "coordinates",
    [
        square(1, 1, 5, 5),  # a ring where a list of rings is expected
        [[square(1, 1, 5, 5)]],  # one level too deep
        [[[1, 1, 0], [2, 1, 0], [2, 2, 0]]],  # 3-D positions
        [[1, 2, 3]],
    ],
)
def test_wrongly_nested_polygon_coordinates_are_refused(coordinates):
    refused(feature(polygon(*coordinates)), match="^feature 0: .*(wrong nesting|must be a list)")


def test_polygon_coordinates_that_are_not_a_list_are_refused():
    refused(
        feature({"type": "Polygon", "coordinates": "0 0 1 1"}),
        match="^feature 0: polygon coordinates must be a non-empty list of rings",
    )


def test_polygon_without_rings_is_refused():
    refused(feature(polygon()), match="^feature 0: polygon coordinates must be a non-empty list of rings")


def test_ring_with_fewer_than_three_distinct_vertices_is_refused():
    refused(
        GOOD, feature(polygon([[1, 1], [2, 2], [1, 1], [2, 2]])),
        match="^feature 1: polygon shell has 2 distinct vertices, at least 3 are needed",
    )


def test_zero_area_polygon_is_refused_as_empty():
    collinear = [[1, 1], [2, 2], [3, 3], [1, 1]]
    refused(feature(polygon(collinear)), match=r"^feature 0: polygon shell is empty \(zero area\)")


def test_zero_area_hole_is_refused_as_empty():
    refused(
        feature(polygon(square(0, 0, 10, 10), [[1, 1], [2, 2], [3, 3]])),
        match=r"^feature 0: polygon hole 1 is empty \(zero area\)",
    )


def test_self_intersecting_polygon_is_refused_with_feature_index():
    bowtie = [[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]
    refused(
        GOOD, GOOD, GOOD, feature(polygon(bowtie)),
        match=r"^feature 3: polygon is self-intersecting \(.*Self-intersection",
    )


def test_hole_outside_shell_is_refused():
    refused(
        feature(polygon(square(0, 0, 4, 4), square(10, 10, 12, 12))),
        match=r"^feature 0: polygon has a hole outside its shell \(Hole lies outside shell",
    )


def test_overlapping_multipolygon_parts_are_refused():
    geometry = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 4, 4)], [square(2, 2, 6, 6)]]}
    refused(feature(geometry), match=r"^feature 0: MultiPolygon parts overlap or cross \(")


def test_invalid_multipolygon_part_is_refused_with_part_index():
    bowtie = [[0, 0], [4, 4], [4, 0], [0, 4]]
    geometry = {"type": "MultiPolygon", "coordinates": [[square(10, 10, 12, 12)], [bowtie]]}
    refused(feature(geometry), match="^feature 0: MultiPolygon part 1 is self-intersecting")


def test_empty_multipolygon_is_refused():
    refused(
        feature({"type": "MultiPolygon", "coordinates": []}),
        match="^feature 0: MultiPolygon coordinates must be a non-empty list of polygons",
    )


@pytest.mark.parametrize("vertex", [[-0.5, 3], [3, -1], [30.01, 3], [3, 20.5]])
def test_vertex_outside_the_image_is_refused(vertex):
    ring = square(1, 1, 5, 5, closed=False)
    ring[1] = vertex
    refused(
        GOOD, feature(polygon(ring)),
        match=r"^feature 1: vertex .* lies outside the image \(x must be in \[0, 30\], y in \[0, 20\]\)",
    )


def test_point_outside_the_image_is_refused():
    refused(feature({"type": "Point", "coordinates": [31, 2]}), match="^feature 0: vertex .* lies outside the image")


def test_vertices_on_the_image_edge_and_within_tolerance_are_accepted():
    out = validate(feature(polygon(square(0, 0, 30, 20))), feature(polygon(square(-1e-7, 0, 30 + 1e-7, 20))))
    assert len(out["features"]) == 2


@pytest.mark.parametrize("bad", [3, [], {"color": [1, 2, 3]}, {"name": ""}, {"name": 5}])
def test_malformed_classification_is_refused(bad):
    refused(feature(GOOD["geometry"], properties={"classification": bad}), match="^feature 0: classification")


def test_class_outside_the_session_classes_is_refused_listing_allowed_names():
    refused(
        feature(GOOD["geometry"], properties={"classification": {"name": "tumour"}}),
        classes=CLASSES,
        match=r"^feature 0: class 'tumour' is not a class of this session \(allowed: 'nucleus', 'stroma'\)",
    )


def test_properties_that_are_not_an_object_are_refused():
    refused(feature(GOOD["geometry"], properties=["a"]), match="^feature 0: properties must be an object")


@pytest.mark.parametrize("value", [object(), {1, 2}, math.nan])
def test_properties_that_are_not_json_serialisable_are_refused(value):
    refused(
        feature(GOOD["geometry"], properties={"note": value}),
        match="^feature 0: properties must be JSON-serialisable",
    )


def test_properties_nested_deeper_than_the_limit_are_refused_naming_the_feature_the_property_and_the_depth():
    """A save whose properties nest 400 lists deep around 100,000 zeros (2 MB of JSON) was stored indented, 204 times
    larger; the nesting is refused from its first 9 levels, without walking or copying the rest."""
    assert annotations.MAX_PROPERTY_DEPTH == 8
    note: list = [0] * 100_000
    for _ in range(399):
        note = [note]
    text = json.dumps(fc_of(GOOD, feature(GOOD["geometry"], properties={"classification": "nucleus", "note": note})))
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"^feature 1: properties are nested too deeply: property 'note' goes "
                                                r"more than 8 levels deep .*the limit is 8$"):
        validate_feature_collection(text, image_shape=SHAPE, classes=CLASSES)
    assert time.perf_counter() - started < 1.0
    at_limit: object = 1  # the properties object is level 1: 7 levels of lists inside it are 8 in all
    for _ in range(7):
        at_limit = [at_limit]
    assert validate(feature(GOOD["geometry"], properties={"note": at_limit}))["features"][0]["properties"]["note"] \
        == at_limit
    refused(feature(GOOD["geometry"], properties={"note": [at_limit]}), match="^feature 0: properties are nested too")
    nine = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}  # objects: 9 levels with properties
    refused(feature(GOOD["geometry"], properties=nine), match="property 'a' goes more than 8 levels deep")
    assert validate(feature(GOOD["geometry"], properties=nine["a"]))["features"][0]["properties"]["b"] == nine["a"]["b"]


def test_properties_holding_more_values_than_the_limit_are_refused_naming_the_limit():
    limit = annotations.MAX_PROPERTY_VALUES
    assert limit == 10_000
    many = {"measurements": {f"m{i}": i + 0.5 for i in range(limit - 2)}, "name": "n1"}  # 10,000 values in all
    assert len(validate(feature(GOOD["geometry"], properties=many))["features"][0]["properties"]["measurements"]) \
        == limit - 2
    many["tags"] = [1]
    refused(GOOD, feature(GOOD["geometry"], properties=many),
            match=f"^feature 1: properties hold more than the limit of {limit} values")
    refused(feature(GOOD["geometry"], properties={"note": [0] * 1_000_000}),
            match=f"^feature 0: properties hold more than the limit of {limit} values .*property 'note'")
    refused(feature(GOOD["geometry"], properties={f"k{i}": i for i in range(limit + 1)}),
            match=f"^feature 0: properties hold {limit + 1} values, more than the limit of {limit}$")


def test_unknown_object_type_is_refused():
    refused(
        feature(GOOD["geometry"], properties={"objectType": "roi"}),
        match="^feature 0: objectType 'roi' is not one of annotation, detection, cell, tile",
    )


def test_invalid_qupath_nucleus_geometry_is_refused():
    cell = feature(polygon(square(0, 0, 10, 10)), nucleusGeometry={"type": "Point", "coordinates": [1, 1]})
    refused(cell, match="^feature 0: nucleusGeometry type 'Point' is not supported")


# ------------------------------------------------------------------------------------------------
# cost: hostile shapes are refused quickly, the limits are checked before any geometry is built
# ------------------------------------------------------------------------------------------------


def _star_and_mirror(n):
    """A {n/(n/2-1)} star polygon then its mirror image through the same first vertex (integer vertices in a
    512 x 1024 image): signed area exactly 0, about n**2/2 self-crossings in a few kilobytes of JSON."""
    k = n // 2 - 1
    angles = [2 * math.pi * (i * k % n) / n for i in range(n)]
    star = [[round(256 + 250 * math.cos(a)), round(256 + 250 * math.sin(a))] for a in angles]
    x0 = star[0][0]
    return star + [[2 * x0 - x, y] for x, y in star[1:]] + [star[0]]


def _serpentine(m):
    """A valid polygon: m long parallel diagonal strips stacked within 100 px, all crossing the same region."""
    eps = 100 / (2 * m + 2)
    ring = []
    for i in range(m):
        y = 2 * i * eps
        ring += [[1, y], [401, y + 400], [401, y + 400 + eps], [1, y + eps]]
    top = ring[-1][1] + eps
    return ring + [[1, top], [0.5, top], [0.5, 0], [1, 0]]


def _nested_thin_cs(h):
    """h concentric thin C-shaped rings around (256, 256), none inside another, with nested bounding boxes."""
    gap = 200 / h
    t, e = gap / 4, gap / 16
    rings = []
    for i in range(h):
        x0 = y0 = 6 + i * gap
        x1 = y1 = 506 - i * gap
        rings.append([[x1, y1], [x0, y1], [x0, y0], [x1, y0], [x1, y0 + t], [x0 + t, y0 + t], [x0 + t, y1 - t - e],
                      [x0 + t + e, y1 - t - 2 * e], [x1, y1 - t], [x1, y1]])
    return rings


def test_zero_area_star_crossing_itself_thousands_of_times_is_refused_as_self_intersecting_at_once(monkeypatch):
    ring = _star_and_mirror(160)  # 319 vertices, 4 KB of JSON: about 50 s when the ring was repaired first
    x, y = np.array(ring, dtype=float).T
    assert np.dot(x[:-1], y[1:]) == np.dot(x[1:], y[:-1])  # signed area exactly 0

    def no_repair(*args, **kwargs):
        raise AssertionError("a caller's geometry is never repaired: make_valid's time grows with its crossings")

    monkeypatch.setattr(annotations.shapely, "make_valid", no_repair)
    start = time.perf_counter()
    refused(
        feature(polygon(ring)), shape=(512, 1024),
        match=r"^feature 0: polygon is self-intersecting \(Self-intersection\[",
    )
    assert time.perf_counter() - start < 2


def test_zero_area_ring_off_one_line_is_refused_as_self_intersecting():
    there_and_back = [[1, 1], [5, 1], [1, 1], [1, 5], [1, 1]]  # two spikes: zero area, not on one line
    refused(feature(polygon(there_and_back)), match=r"^feature 0: polygon is self-intersecting \(")


def test_ring_with_more_vertices_than_the_limit_is_refused_naming_the_limit():
    n = annotations.MAX_RING_VERTICES + 1
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.c_[15 + 5 * np.cos(t), 10 + 5 * np.sin(t)].tolist()
    refused(
        feature(polygon(ring)),
        match=rf"^feature 0: polygon shell has {n} vertices, more than the limit of 100000$",
    )
    # checked before the coordinates are read
    refused(
        GOOD, feature(polygon(square(0, 0, 10, 10), [None] * n)),
        match=rf"^feature 1: polygon hole 1 has {n} vertices, more than the limit of 100000$",
    )


def test_wiggly_ring_of_as_many_vertices_as_the_limit_is_accepted():
    t = np.linspace(0, 2 * np.pi, annotations.MAX_RING_VERTICES, endpoint=False)
    r = 200 + 20 * np.sin(60 * t) + np.random.default_rng(0).uniform(-0.2, 0.2, t.size)
    ring = np.c_[256 + r * np.cos(t), 256 + r * np.sin(t)].tolist()
    start = time.perf_counter()
    out = validate(feature(polygon(ring)), shape=(512, 512))
    assert len(out["features"][0]["geometry"]["coordinates"][0]) == annotations.MAX_RING_VERTICES + 1
    assert time.perf_counter() - start < 10  # about 0.5 s


def test_geometry_with_more_vertices_in_all_its_rings_than_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(annotations, "MAX_GEOMETRY_VERTICES", 12)
    validate(feature(polygon(square(0, 0, 10, 10), square(2, 2, 4, 4))))  # 10 vertices
    parts = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 2, 2)], [square(3, 3, 5, 5)], [square(6, 6, 8, 8)]]}
    refused(
        GOOD, feature(parts),
        match=r"^feature 1: geometry has more than the limit of 12 vertices in all its rings \(split it",
    )
    cell = feature(GOOD["geometry"], nucleusGeometry=parts)
    refused(cell, match=r"^feature 0: nucleusGeometry has more than the limit of 12 vertices in all its rings")


def test_annotation_with_more_polygon_vertices_in_all_than_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(annotations, "MAX_VERTICES", 12)
    point = feature({"type": "Point", "coordinates": [1, 1]})
    validate(GOOD, point, GOOD, point)  # 10 polygon vertices; points do not count
    refused(
        GOOD, point, GOOD, GOOD,
        match=r"^feature 3: the annotation has more than the limit of 12 polygon vertices in all$",
    )


@pytest.mark.parametrize(
    "geometry",
    [
        polygon(_serpentine(4000)),  # 16,000 vertices: crossings sought among chains all side by side
        polygon(square(0, 0, 512, 512), *_nested_thin_cs(3000)),  # holes tested for nesting in one another
        {"type": "MultiPolygon", "coordinates": [[c] for c in _nested_thin_cs(3000)]},  # parts, likewise
    ],
    ids=["zigzag outline", "nested holes", "nested parts"],
)
def test_valid_but_hostile_polygons_are_refused_as_too_convoluted_without_checking_them(geometry):
    start = time.perf_counter()
    refused(
        feature(geometry), shape=(512, 512),
        match=r"^feature 0: (polygon|MultiPolygon) is too convoluted to check: .* limit of 67108864$",
    )
    assert time.perf_counter() - start < 2  # checking them took up to 2 s (grows as the square of the size)


def test_outline_overlap_limit_is_for_the_whole_annotation(monkeypatch):
    zigzag = feature(polygon(_serpentine(20)))
    one = annotations._outline_overlap([[np.array(_serpentine(20), dtype=float)]], limit=2**40)
    monkeypatch.setattr(annotations, "MAX_OUTLINE_OVERLAP", 2 * one + one // 2)
    validate(zigzag, GOOD, zigzag, shape=(512, 512))
    refused(
        zigzag, GOOD, zigzag, zigzag, shape=(512, 512),
        match=rf"^feature 3: polygon is too convoluted to check: .* limit of {2 * one + one // 2}$",
    )


def test_real_outlines_use_a_few_outline_overlap_per_vertex(monkeypatch):
    from skimage.data import binary_blobs
    from skimage.measure import label

    labels = label(binary_blobs(1024, blob_size_fraction=0.1, volume_fraction=0.5, rng=1))
    fc, _ = _mask_to_feature_collection(labels)
    coordinates = [f["geometry"]["coordinates"] for f in fc["features"]]
    n = sum(len(r) for c in coordinates for rings in (c if isinstance(c[0][0][0], list) else [c]) for r in rings)
    assert n > 10_000
    monkeypatch.setattr(annotations, "MAX_OUTLINE_OVERLAP", 16 * n)  # about 5 per vertex, at most about 15
    validate_feature_collection(fc, image_shape=labels.shape)


# ------------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------------


def test_open_rings_are_closed_and_coordinates_become_floats():
    out = validate(feature(polygon(square(1, 1, 5, 5, closed=False), square(2, 2, 3, 3, closed=False))))
    rings = out["features"][0]["geometry"]["coordinates"]
    assert [len(r) for r in rings] == [5, 5]
    assert all(r[0] == r[-1] for r in rings)
    assert all(type(v) is float for r in rings for p in r for v in p)


def test_closed_rings_are_not_closed_twice():
    out = validate(GOOD)
    assert out["features"][0]["geometry"]["coordinates"][0] == [[float(v) for v in p] for p in square(1, 1, 5, 5)]


def test_object_type_defaults_to_annotation_and_given_types_are_kept():
    out = validate(GOOD, feature(GOOD["geometry"], properties={"objectType": "cell"}))
    assert [f["properties"]["objectType"] for f in out["features"]] == ["annotation", "cell"]


def test_classification_takes_the_colour_of_the_session_class():
    given = {"name": "stroma", "color": [1, 2, 3], "extra": "dropped"}
    out = validate(feature(GOOD["geometry"], properties={"classification": given}), classes=CLASSES)
    assert out["features"][0]["properties"]["classification"] == {"name": "stroma", "color": [0, 255, 128]}


def test_qupath_string_classification_is_normalised_to_an_object():
    out = validate(feature(GOOD["geometry"], properties={"classification": "nucleus"}), classes=CLASSES)
    assert out["features"][0]["properties"]["classification"] == {"name": "nucleus", "color": [255, 0, 0]}


def test_without_classes_a_valid_colour_is_kept_and_an_invalid_one_dropped():
    out = validate(
        feature(GOOD["geometry"], properties={"classification": {"name": "a", "color": [10, 20, 30]}}),
        feature(GOOD["geometry"], properties={"classification": {"name": "b", "color": [10, 20, 300]}}),
        feature(GOOD["geometry"], properties={"classification": {"name": "c", "color": "#ff0000"}}),
    )
    got = [f["properties"]["classification"] for f in out["features"]]
    assert got == [{"name": "a", "color": [10, 20, 30]}, {"name": "b"}, {"name": "c"}]


def test_unclassified_features_have_no_classification():
    out = validate(GOOD, feature(GOOD["geometry"], properties={"classification": None}), classes=CLASSES)
    assert all("classification" not in f["properties"] for f in out["features"])


def test_string_and_int_ids_are_kept_and_others_replaced_by_uuid4():
    out = validate(
        feature(GOOD["geometry"], id="abc"), feature(GOOD["geometry"], id=7),
        feature(GOOD["geometry"], id=True), feature(GOOD["geometry"], id=[1]), GOOD,
    )
    ids = [f["id"] for f in out["features"]]
    assert ids[:2] == ["abc", 7]
    for new in ids[2:]:
        assert uuid.UUID(new).version == 4
    assert len(set(ids[2:])) == 3


def test_other_properties_are_kept():
    props = {"name": "n1", "measurements": {"area": 12.5}, "isLocked": False, "tags": [1, "x"]}
    out = validate(feature(GOOD["geometry"], properties=props))
    assert out["features"][0]["properties"] == {**props, "objectType": "annotation"}


def test_points_multipolygons_and_nucleus_geometries_are_accepted():
    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 2, 2, closed=False)], [square(4, 4, 6, 6)]]}
    cell = feature(polygon(square(0, 0, 10, 10)), nucleusGeometry=polygon(square(2, 2, 4, 4, closed=False)))
    out = validate(feature({"type": "Point", "coordinates": [3, 4]}), feature(multi), cell)
    point, multipolygon, cell_out = out["features"]
    assert point["geometry"] == {"type": "Point", "coordinates": [3.0, 4.0]}
    assert [len(p[0]) for p in multipolygon["geometry"]["coordinates"]] == [5, 5]
    assert cell_out["nucleusGeometry"]["coordinates"][0][-1] == [2.0, 2.0]


def test_unknown_top_level_keys_are_dropped():
    out = validate_feature_collection({**fc_of({**GOOD, "foo": 1}), "crs": "x"}, image_shape=SHAPE)
    assert set(out) == {"type", "features"}
    assert set(out["features"][0]) == {"type", "id", "geometry", "properties"}


def test_output_shares_no_mutable_object_with_input_and_input_is_unchanged():
    props = {"classification": {"name": "a", "color": [1, 2, 3]}, "nested": {"list": [1, 2]}}
    obj = fc_of(feature(polygon(square(1, 1, 5, 5)), properties=props, id="f"))
    before = copy.deepcopy(obj)
    out = validate_feature_collection(obj, image_shape=SHAPE)
    assert obj == before

    def containers(value, acc):
        if isinstance(value, (dict, list)):
            acc.add(id(value))
            for child in value.values() if isinstance(value, dict) else value:
                containers(child, acc)
        return acc

    assert containers(out, set()).isdisjoint(containers(obj, set()))


def test_output_is_json_serialisable():
    json.dumps(validate(GOOD, feature({"type": "Point", "coordinates": [1, 1]})), allow_nan=False)


# ------------------------------------------------------------------------------------------------
# rasterize
# ------------------------------------------------------------------------------------------------


def test_square_0_2_labels_exactly_pixels_0_and_1_by_pixel_centre():
    labels = rasterize(fc_of(feature(polygon(square(0, 0, 2, 2)))), shape=(4, 4))
    expected = np.zeros((4, 4), dtype=np.uint16)
    expected[0:2, 0:2] = 1
    np.testing.assert_array_equal(labels, expected)


def test_x_is_column_and_y_is_row():
    # x in [1, 4] (columns 1..3), y in [0, 1] (row 0)
    labels = rasterize(fc_of(feature(polygon(square(1, 0, 4, 1)))), shape=(3, 5))
    assert np.argwhere(labels == 1).tolist() == [[0, 1], [0, 2], [0, 3]]


def test_pixel_whose_centre_is_outside_a_triangle_is_not_labelled():
    # triangle (0,0)-(2,0)-(0,2): centre (1.5, 1.5) of pixel (1, 1) lies outside it (x + y = 3 > 2)
    labels = rasterize(fc_of(feature(polygon([[0, 0], [2, 0], [0, 2]]))), shape=(3, 3))
    assert np.argwhere(labels == 1).tolist() == [[0, 0], [0, 1], [1, 0]]


def test_rasterize_returns_uint16_of_the_requested_shape():
    labels = rasterize(fc_of(GOOD), shape=(7, 9))
    assert labels.shape == (7, 9) and labels.dtype == np.uint16


def test_empty_collection_rasterizes_to_background():
    labels = rasterize(fc_of(), shape=(3, 4))
    assert labels.dtype == np.uint16 and not labels.any()


def test_later_features_overwrite_earlier_ones_where_they_overlap():
    fc = fc_of(feature(polygon(square(0, 0, 4, 4))), feature(polygon(square(2, 2, 6, 6))))
    labels = rasterize(fc, shape=(6, 6))
    assert labels[1, 1] == 1 and labels[3, 3] == 2 and labels[5, 5] == 2
    assert (labels == 1).sum() == 16 - 4


def test_points_are_not_drawn_and_take_no_label():
    fc = fc_of(feature({"type": "Point", "coordinates": [1, 1]}), feature(polygon(square(0, 0, 2, 2))))
    labels = rasterize(fc, shape=(3, 3))
    assert set(np.unique(labels)) == {0, 1}
    assert labels[0, 0] == 1


def test_holes_are_left_unlabelled_and_earlier_features_show_through():
    fc = fc_of(
        feature(polygon(square(3, 3, 5, 5))),
        feature(polygon(square(0, 0, 8, 8), square(2, 2, 6, 6))),
    )
    labels = rasterize(fc, shape=(8, 8))
    assert (labels[2:6, 2:6] != 2).all()
    assert (labels[3:5, 3:5] == 1).all()
    assert labels[2, 2] == 0
    assert (labels == 2).sum() == 64 - 16


def test_multipolygon_parts_share_one_label():
    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 2, 2)], [square(4, 4, 6, 6)]]}
    fc = fc_of(feature(polygon(square(2, 0, 3, 1))), feature(multi))
    labels = rasterize(fc, shape=(6, 6))
    assert (labels[0:2, 0:2] == 2).all() and (labels[4:6, 4:6] == 2).all()
    assert labels[0, 2] == 1
    assert (labels == 2).sum() == 8


def test_polygons_beyond_the_output_are_clipped():
    labels = rasterize(fc_of(feature(polygon(square(2, 2, 10, 10)))), shape=(4, 4))
    assert (labels[2:, 2:] == 1).all() and (labels == 1).sum() == 4


def test_more_polygons_than_uint16_holds_switch_to_uint32(monkeypatch):
    monkeypatch.setattr(annotations, "MAX_UINT16_LABEL", 2)
    fc = fc_of(*(feature(polygon(square(i, 0, i + 1, 1))) for i in range(3)))
    labels = rasterize(fc, shape=(1, 3))
    assert labels.dtype == np.uint32
    assert labels.tolist() == [[1, 2, 3]]
    monkeypatch.setattr(annotations, "MAX_UINT16_LABEL", 3)
    assert rasterize(fc, shape=(1, 3)).dtype == np.uint16


def test_65535_polygons_stay_uint16():
    assert annotations.MAX_UINT16_LABEL == np.iinfo(np.uint16).max


def test_rasterize_does_not_mutate_the_collection():
    fc = fc_of(feature(polygon(square(0, 0, 2, 2))))
    before = copy.deepcopy(fc)
    rasterize(fc, shape=(3, 3))
    assert fc == before


def test_rasterize_refuses_unsupported_geometry():
    fc = fc_of(feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}))
    with pytest.raises(InvalidInputError, match="feature 0: geometry type 'LineString' cannot be rasterised"):
        rasterize(fc, shape=(3, 3))


def test_outlines_too_costly_to_draw_are_refused_before_drawing():
    # 2100 hairline triangles from top to bottom of a 2048 px image: 4200 edges crossing every row
    thin = [feature(polygon([[x / 2, 0], [x / 2 + 0.01, 2048], [x / 2 + 0.02, 0]])) for x in range(2100)]
    fc = validate(*thin, shape=(2048, 2048))
    with pytest.raises(InvalidInputError, match=r"too complex to store: its outlines cross \d+ pixel rows in all, "
                                                r"more than the limit of 8388608"):
        rasterize(fc, shape=(2048, 2048))
    assert not rasterize(validate(*thin[:900], shape=(2048, 2048)), shape=(2048, 2048)).any()  # hairlines: no centre


def test_polygons_covering_the_image_too_many_times_over_are_refused():
    whole = feature(polygon(square(0, 0, 2000, 2000)))
    fc = validate(*[whole] * (annotations.MAX_COVERAGE + 1), shape=(2000, 2000))
    with pytest.raises(InvalidInputError, match="cover 9.0 times the image's area in all, more than the limit of 8"):
        rasterize(fc, shape=(2000, 2000))
    assert (rasterize(validate(*[whole] * 8, shape=(2000, 2000)), shape=(2000, 2000)) == 8).all()


def test_rasterize_gives_skimages_pixels_for_collections_with_holes_parts_and_overlaps():
    from skimage.draw import polygon as skimage_polygon

    rng = np.random.default_rng(0)
    features, expected = [], np.zeros((60, 80), dtype=np.uint16)
    for label in range(1, 41):
        cx, cy, radius = rng.uniform(0, 80), rng.uniform(0, 60), rng.uniform(4, 15)
        t = np.linspace(0, 2 * np.pi, int(rng.integers(5, 12)), endpoint=False)
        shell = np.clip(np.c_[cx + radius * np.cos(t), cy + radius * np.sin(t)], 0, [80, 60])
        shell = np.round(shell * 2) / 2 if label % 2 else shell  # half-integer vertices: boundary cases
        hole = np.c_[cx + radius / 3 * np.cos(t), cy + radius / 3 * np.sin(t)]
        inner = radius < cx < 80 - radius and radius < cy < 60 - radius  # a hole only where the shell is unclipped
        rings = [shell.tolist(), hole.tolist()] if label % 3 == 0 and inner else [shell.tolist()]
        features.append(feature(polygon(*rings)))
        inside = np.zeros_like(expected, dtype=bool)
        inside[skimage_polygon(shell[:, 1] - 0.5, shell[:, 0] - 0.5, expected.shape)] = True
        if len(rings) == 2:
            inside[skimage_polygon(hole[:, 1] - 0.5, hole[:, 0] - 0.5, expected.shape)] = False
        expected[inside] = label
    np.testing.assert_array_equal(rasterize(validate(*features, shape=(60, 80)), shape=(60, 80)), expected)


def _mask_to_feature_collection(labels):
    """One feature per object from all its find_contours contours, filled by the even-odd rule.

    Contours are in pixel-centre ``(row, col)`` units; ``rc_to_xy(...) + 0.5`` makes them ``[x, y]``.
    Nested contours become holes and separate pieces (e.g. only diagonally connected) MultiPolygon parts.
    """
    from functools import reduce

    import shapely
    from shapely.geometry import mapping
    from skimage.measure import find_contours, regionprops

    features = []
    ids = []
    for region in regionprops(labels):
        r0, c0, _, _ = region.bbox
        crop = np.pad(region.image, 1).astype(np.float64)  # pad so contours of edge objects close
        rings = [rc_to_xy(c + np.array([r0 - 1, c0 - 1])) + 0.5 for c in find_contours(crop, 0.5)]
        geometry = reduce(shapely.symmetric_difference, [shapely.polygons(r) for r in rings])
        features.append(feature(json.loads(json.dumps(mapping(geometry)))))
        ids.append(region.label)
    return fc_of(*features), ids


def _assert_round_trip(labels, *, min_iou):
    fc, ids = _mask_to_feature_collection(labels)
    out = rasterize(validate_feature_collection(fc, image_shape=labels.shape), shape=labels.shape)
    for new_label, old_label in enumerate(ids, start=1):
        a, b = labels == old_label, out == new_label
        iou = (a & b).sum() / (a | b).sum()
        assert iou > min_iou, f"object {old_label}: IoU {iou:.3f}"


def test_contours_of_synthetic_objects_rasterize_back_exactly():
    from skimage.draw import disk, ellipse

    labels = np.zeros((40, 50), dtype=np.uint16)
    labels[disk((10, 10), 6, shape=labels.shape)] = 1
    labels[ellipse(25, 35, 8, 12, shape=labels.shape, rotation=0.5)] = 2
    labels[0:5, 45:50] = 3  # touches two image edges
    labels[35:37, 2:4] = 4  # 2 x 2 object
    _assert_round_trip(labels, min_iou=0.99)


def test_contours_of_blobs_with_holes_and_diagonal_pieces_rasterize_back_exactly():
    from skimage.data import binary_blobs
    from skimage.measure import label

    labels = label(binary_blobs(128, blob_size_fraction=0.08, volume_fraction=0.5, rng=4))
    fc, ids = _mask_to_feature_collection(labels)
    geometries = [f["geometry"] for f in fc["features"]]
    assert any(g["type"] == "MultiPolygon" for g in geometries)  # the case is really exercised
    polygons = [p for g in geometries for p in ([g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"])]
    assert any(len(rings) > 1 for rings in polygons)  # and holes
    assert ids == list(range(1, labels.max() + 1))
    out = rasterize(validate_feature_collection(fc, image_shape=labels.shape), shape=labels.shape)
    np.testing.assert_array_equal(out, labels)


@pytest.mark.skipif(not NUCLEI_MASK.exists(), reason=f"{NUCLEI_MASK.name} is not in tests/data yet")
def test_contours_of_real_nuclei_mask_rasterize_back_with_iou_above_0_9():
    import tifffile
    from skimage.measure import label

    mask = np.asarray(tifffile.imread(NUCLEI_MASK))
    mask = np.squeeze(mask)
    assert mask.ndim == 2
    labels = label(mask > 0) if mask.max() == 1 else mask.astype(np.int64)
    assert labels.max() > 0
    _assert_round_trip(labels, min_iou=0.9)


# ------------------------------------------------------------------------------------------------
# label_properties
# ------------------------------------------------------------------------------------------------


def test_label_properties_match_rasterize_labels_and_skip_points():
    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 2, 2)], [square(4, 4, 6, 6)]]}
    fc = validate(
        feature({"type": "Point", "coordinates": [1, 1]}, properties={"classification": "nucleus"}),
        feature(polygon(square(0, 0, 8, 8), square(2, 2, 6, 6)), id="ring", properties={"classification": "stroma"}),
        feature(multi, id=9),
        classes=CLASSES,
    )
    props = label_properties(fc)
    assert props == [
        {"label": 1, "feature_id": "ring", "class_name": "stroma", "area": 48.0,
         "centroid": [4.0, 4.0], "bbox": [0.0, 0.0, 8.0, 8.0]},
        {"label": 2, "feature_id": 9, "class_name": None, "area": 8.0,
         "centroid": [3.0, 3.0], "bbox": [0.0, 0.0, 6.0, 6.0]},
    ]
    labels = rasterize(fc, shape=(8, 8))
    assert set(np.unique(labels)) == {0} | {p["label"] for p in props}


def test_a_multipolygon_is_charged_its_outline_overlap_once_not_once_more_per_part(monkeypatch):
    """Two wavy blobs as one MultiPolygon (a QuPath export): accepted while the whole's overlap fits the limit,
    refused once it does not; the parts' own overlap is part of the whole's, not charged a second time."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)

    def blob(cx, cy):
        r = 60 + 3 * np.sin(40 * t)
        ring = np.c_[cx + r * np.cos(t), cy + r * np.sin(t)]
        return np.concatenate([ring, ring[:1]])

    a, b = blob(100, 100), blob(300, 300)
    whole = annotations._outline_overlap([[a], [b]], limit=2**40)
    parts = annotations._outline_overlap([[a]], limit=2**40) + annotations._outline_overlap([[b]], limit=2**40)
    assert whole >= parts > 0
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "MultiPolygon", "coordinates": [[a.tolist()], [b.tolist()]]}}]}
    monkeypatch.setattr(annotations, "MAX_OUTLINE_OVERLAP", whole + parts // 2)  # fits once, not counted twice
    assert len(annotations.validate_feature_collection(fc, image_shape=(512, 512))["features"]) == 1
    monkeypatch.setattr(annotations, "MAX_OUTLINE_OVERLAP", whole - 1)
    with pytest.raises(InvalidInputError, match="too convoluted"):
        annotations.validate_feature_collection(fc, image_shape=(512, 512))
