"""Outlines on the wire between colabel's own processes: coordinate lists packed as arrays.

hypha-rpc's Python client turns every dict it receives into an ``ObjectProxy`` with munch's ``munchify``,
which walks nested lists element by element: about 1.5 us per coordinate, 19 ms for one 6,000-vertex ring
(``bench/models.py``). A GeoJSON ring packed as one float array crosses as a single typed buffer instead.
The gateway's ``call_packed(method, *args)`` returns ``pack(result)``; colabel's
:class:`~colabel.apps.provider.assist.ModelAssist` calls it for services running elsewhere and unpacks, so
what it hands on is the same JSON as the plain function's. Other clients keep calling the plain functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PACKED = "__colabel_points__"  # {PACKED: ndarray (N, D), "ints": bool}
MIN_POINTS = 16  # shorter lists are cheaper as they are


def _points(value: list) -> np.ndarray | None:
    """``value`` as an (N, 2|3) numeric array when it is a list of coordinate pairs/triples, else None."""
    if len(value) < MIN_POINTS:
        return None
    first = value[0]
    if not isinstance(first, list | tuple) or len(first) not in (2, 3):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in first):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged
        return None
    if array.ndim != 2 or array.dtype.kind not in "if":
        return None
    return array


def pack(obj: Any) -> Any:
    """A copy of ``obj`` (JSON-like: dicts, lists, numbers, strings, arrays) with every list of at least
    ``MIN_POINTS`` coordinate pairs or triples replaced by ``{PACKED: array, "ints": bool}``."""
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        array = _points(obj) if isinstance(obj, list) else None
        if array is not None:
            ints = array.dtype.kind == "i"
            return {PACKED: array.astype(np.int64 if ints else np.float64), "ints": ints}
        return [pack(v) for v in obj]
    return obj


def unpack(obj: Any) -> Any:
    """The inverse of :func:`pack`: plain dicts and lists again (ints stay ints, floats exact)."""
    if isinstance(obj, dict):
        if PACKED in obj:
            return np.asarray(obj[PACKED]).tolist()
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [unpack(v) for v in obj]
    return obj
