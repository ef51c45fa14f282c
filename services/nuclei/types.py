"""Typed results of nucleus segmentation: one :class:`Nucleus` per object and the :class:`NucleusResult`.

Coordinates follow :mod:`colabel.coords`: ``[x, y]`` pixels of the full-resolution image, ``x`` = column,
``y`` = row (down), origin at the top-left corner of the top-left pixel; pixel ``(r, c)`` covers
``[c, c + 1) x [r, r + 1)``. A result computed on a region carries the region's ``origin``; its label image
covers the region only, while every nucleus coordinate is in the full-image frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Nucleus", "NucleusResult", "type_color"]

# distinct colours for nucleus types 1.. (QuPath classification colours, [r, g, b])
_PALETTE = [
    (255, 0, 0),
    (0, 160, 0),
    (0, 0, 255),
    (255, 200, 0),
    (255, 140, 0),
    (160, 0, 200),
    (0, 200, 200),
    (200, 0, 120),
    (120, 80, 0),
    (100, 100, 100),
]


def type_color(type_id: int) -> list[int]:
    """A stable ``[r, g, b]`` colour for nucleus type *type_id* (0..255 ints)."""
    return list(_PALETTE[(int(type_id) - 1) % len(_PALETTE)]) if type_id > 0 else [128, 128, 128]


@dataclasses.dataclass(frozen=True)
class Nucleus:
    """One segmented nucleus.

    Attributes
    ----------
    id : int
        Its value in :attr:`NucleusResult.labels` (1-based, unique in the result).
    bbox : tuple of 4 float
        ``(xmin, ymin, xmax, ymax)`` in full-image pixels: the pixel-corner box of its pixels
        (``xmax = last column + 1``).
    centroid : tuple of 2 float
        ``(x, y)``: the mean of its pixel centres ``(c + 0.5, r + 0.5)``.
    polygon : dict
        GeoJSON ``Polygon`` geometry of its outline in full-image ``[x, y]`` pixels (closed ring, no
        holes), tracing the boundary between its pixels and the others (corners cut by half a pixel).
        Treat as read-only.
    area : float
        Number of its pixels (px²); the polygon's area differs by about a quarter pixel per corner.
    type : int or None
        Its nucleus type when the backend classifies (e.g. HoVer-Net's ``tp`` branch), else None.
    type_prob : float or None
        Share of its pixels that voted for :attr:`type`, in ``[0, 1]``.
    """

    id: int
    bbox: tuple[float, float, float, float]
    centroid: tuple[float, float]
    polygon: dict
    area: float
    type: int | None = None
    type_prob: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists instead of tuples)."""
        return {
            "id": self.id,
            "bbox": list(self.bbox),
            "centroid": list(self.centroid),
            "polygon": self.polygon,
            "area": self.area,
            "type": self.type,
            "type_prob": self.type_prob,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Nucleus":
        return cls(
            id=int(data["id"]),
            bbox=tuple(float(v) for v in data["bbox"]),
            centroid=tuple(float(v) for v in data["centroid"]),
            polygon=data["polygon"],
            area=float(data["area"]),
            type=None if data.get("type") is None else int(data["type"]),
            type_prob=None if data.get("type_prob") is None else float(data["type_prob"]),
        )

    def to_feature(self, type_names: dict[int, str] | None = None) -> dict:
        """A QuPath-style GeoJSON Feature: ``objectType`` ``"detection"``, classification when typed."""
        properties: dict[str, Any] = {
            "objectType": "detection",
            "measurements": {
                "Area px^2": self.area,
                "Centroid X px": self.centroid[0],
                "Centroid Y px": self.centroid[1],
            },
        }
        if self.type is not None:
            name = (type_names or {}).get(self.type, f"type {self.type}")
            properties["classification"] = {"name": name, "color": type_color(self.type)}
            properties["measurements"]["Type probability"] = self.type_prob
        return {"type": "Feature", "id": self.id, "geometry": self.polygon, "properties": properties}


@dataclasses.dataclass
class NucleusResult:
    """Nuclei found in an image or a region of it.

    Attributes
    ----------
    labels : ndarray (H, W), uint32
        Instance labels of the segmented region (the whole image when no region was asked): 0 =
        background, ``k`` = the nucleus whose ``id`` is ``k``. Row ``r`` is image row ``origin[1] + r``.
    nuclei : list of Nucleus
        In increasing ``id`` order; coordinates in the full-image frame.
    backend : str
        Name of the backend that produced it.
    type_names : dict or None
        ``{type: name}`` when the backend classifies nuclei.
    origin : tuple of 2 int, default (0, 0)
        ``(x, y)`` of the region's top-left pixel in the full image.
    image_shape : tuple of 2 int or None
        ``(height, width)`` of the full image (the frame of the coordinates).
    """

    labels: np.ndarray
    nuclei: list[Nucleus]
    backend: str
    type_names: dict[int, str] | None = None
    origin: tuple[int, int] = (0, 0)
    image_shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.nuclei)

    def to_geojson(self) -> dict:
        """A GeoJSON FeatureCollection of the nuclei (QuPath detections), valid for
        :func:`colabel.apps.provider.annotations.validate_feature_collection` with the full image's shape.
        """
        return {"type": "FeatureCollection", "features": [n.to_feature(self.type_names) for n in self.nuclei]}

    def to_dict(self, *, include_labels: bool = True) -> dict:
        """Wire form: plain types plus the label image as a numpy array (hypha-rpc carries ndarrays).

        Keys: ``backend``, ``type_names`` (string keys, as JSON needs), ``origin`` ``[x, y]``,
        ``image_shape`` ``[h, w]``, ``count``, ``nuclei`` (list of :meth:`Nucleus.to_dict`) and, with
        *include_labels*, ``labels`` (H, W) uint32.
        """
        out = {
            "backend": self.backend,
            "type_names": None if self.type_names is None else {str(k): v for k, v in self.type_names.items()},
            "origin": list(self.origin),
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "count": len(self.nuclei),
            "nuclei": [n.to_dict() for n in self.nuclei],
        }
        if include_labels:
            out["labels"] = self.labels
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "NucleusResult":
        """Inverse of :meth:`to_dict` (requires ``labels``)."""
        names = data.get("type_names")
        shape = data.get("image_shape")
        return cls(
            labels=np.asarray(data["labels"], dtype=np.uint32),
            nuclei=[Nucleus.from_dict(n) for n in data["nuclei"]],
            backend=str(data["backend"]),
            type_names=None if names is None else {int(k): str(v) for k, v in names.items()},
            origin=tuple(int(v) for v in data.get("origin", (0, 0))),
            image_shape=None if shape is None else tuple(int(v) for v in shape),
        )
