"""Outlines packed as arrays between colabel's processes come back as the same JSON."""

from __future__ import annotations

import json

import numpy as np

from colabel.services.wire import MIN_POINTS, PACKED, pack, unpack


def _result(rng) -> dict:
    ring = rng.uniform(0, 500, (6000, 2)).round(3).tolist()
    hole = [[10, 10], *[[10 + i, 20] for i in range(MIN_POINTS)], [10, 10]]  # ints stay ints
    short = [[1.5, 2.5], [3.5, 4.5], [1.5, 2.5]]
    return {"features": [{"type": "Feature", "id": "a", "properties": {"score": 0.9, "tags": ["x", "y"]},
                          "geometry": {"type": "Polygon", "coordinates": [ring, hole]}},
                         {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [short]}}],
            "bbox": [1, 2, 3, 4], "score": 0.5, "mask": np.zeros((4, 4), np.uint8), "name": None}


def test_pack_then_unpack_gives_back_the_same_json_with_ints_and_floats_exact():
    original = _result(np.random.default_rng(0))
    back = unpack(pack(original))
    mask = back.pop("mask")
    assert isinstance(mask, np.ndarray) and mask.shape == (4, 4)  # arrays pass through untouched
    expected = {k: v for k, v in original.items() if k != "mask"}
    assert json.dumps(back, sort_keys=True) == json.dumps(expected, sort_keys=True)
    hole = back["features"][0]["geometry"]["coordinates"][1]
    assert all(type(v) is int for point in hole for v in point)


def test_only_long_numeric_point_lists_are_packed():
    packed = pack(_result(np.random.default_rng(1)))
    rings = packed["features"][0]["geometry"]["coordinates"]
    assert PACKED in rings[0] and rings[0][PACKED].shape == (6000, 2) and rings[0]["ints"] is False
    assert PACKED in rings[1] and rings[1]["ints"] is True
    assert packed["features"][1]["geometry"]["coordinates"][0] == [[1.5, 2.5], [3.5, 4.5], [1.5, 2.5]]
    assert packed["bbox"] == [1, 2, 3, 4]
    ragged = [[1, 2], [3]] * MIN_POINTS
    strings = [["a", "b"]] * MIN_POINTS
    booleans = [[True, False]] * MIN_POINTS
    assert pack(ragged) == ragged and pack(strings) == strings and pack(booleans) == booleans
