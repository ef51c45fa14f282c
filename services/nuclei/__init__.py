"""Nucleus instance segmentation (the HoVer-Net role in HALS).

``segment_nuclei(image, backend="classical" | "hovernet" | instance, region=..., cache=...)`` returns a
:class:`NucleusResult` (label image + one :class:`Nucleus` per object with bbox, centroid, GeoJSON polygon,
area and optional type). Backends implement :class:`NucleusSegmenter` and are registered by name.

Importing this package does not import torch; :mod:`colabel.services.nuclei.hovernet` does, lazily, when
a network is built.
"""

from .base import (
    NucleusCache,
    NucleusSegmenter,
    Segmentation,
    available_backends,
    get_backend,
    measure_nuclei,
    parse_region,
    register_backend,
    segment_nuclei,
    tile_grid,
    validate_image,
)
from .classical import ClassicalSegmenter, detect_stain
from .metrics import aji, f1_at, match_instances
from .types import Nucleus, NucleusResult

__all__ = [
    "segment_nuclei",
    "NucleusResult",
    "Nucleus",
    "NucleusSegmenter",
    "Segmentation",
    "NucleusCache",
    "register_backend",
    "get_backend",
    "available_backends",
    "validate_image",
    "parse_region",
    "tile_grid",
    "measure_nuclei",
    "ClassicalSegmenter",
    "detect_stain",
    "match_instances",
    "f1_at",
    "aji",
]
