"""The nucleus-segmentation model service: a plain class that Ray Serve deploys and the gateway exposes.

No transport here; :mod:`colabel.services.deployments` names this class and its scaling, and
:mod:`colabel.services.gateway` registers :attr:`NucleiService.rpc_functions` as a Hypha service.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError

from .base import (
    DEFAULT_MAX_DISK_BYTES,
    NucleusCache,
    available_backends,
    backend_needs_weights,
    get_backend,
    segment_nuclei,
)


class NucleiService:
    """Automatic nucleus instance segmentation (HALS's HoverNet role).

    Parameters
    ----------
    backend : str
        Default backend name (``"classical"`` needs no weights; ``"hovernet"`` needs ``checkpoint``).
    backend_options : dict, optional
        Options of the default backend (e.g. ``{"checkpoint": "/path/hovernet.tar"}`` for HoVer-Net).
    cache_dir : str, optional
        Folder for cached results (shared by replicas); memory only when None.
    max_cached : int
        Results kept in memory.
    cache_disk_bytes : int or None, default 2 GiB
        Budget of the results in ``cache_dir`` in bytes, least recently used deleted first (None or 0: unbounded;
        see :class:`~colabel.services.nuclei.base.NucleusCache`).
    """

    rpc_functions = ("info", "segment")

    def __init__(self, backend: str = "classical", backend_options: dict | None = None,
                 cache_dir: str | None = None, max_cached: int = 32,
                 cache_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES) -> None:
        self.default_backend = backend
        self.backend_options = dict(backend_options or {})
        self.cache = NucleusCache(max_items=max_cached, directory=Path(cache_dir) if cache_dir else None,
                                  max_disk_bytes=cache_disk_bytes)
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _backend(self, name: str | None):
        name = name or self.default_backend
        if not isinstance(name, str) or name not in available_backends():
            raise InvalidInputError(f"unknown nucleus backend {name!r}; known: {available_backends()}")
        if name != self.default_backend and backend_needs_weights(name):
            # built with no options it would run random weights and present their output as results
            raise InvalidInputError(
                f"nucleus backend {name!r} is not configured on this service (it needs weights, e.g. a "
                f"checkpoint); use the default backend {self.default_backend!r}, or start the service with "
                f"backend={name!r} and its weights"
            )
        with self._lock:
            if name not in self._backends:
                options = self.backend_options if name == self.default_backend else {}
                self._backends[name] = get_backend(name, **options)
            return self._backends[name]

    def info(self) -> dict:
        """Backends available and the default one."""
        return {"default_backend": self.default_backend, "backends": available_backends()}

    def segment(self, image: np.ndarray, region: Any = None, backend: str | None = None,
                mpp: float | None = None, include_labels: bool = True) -> dict:
        """Segment the nuclei of ``image`` (H, W) or (H, W, C), or of ``region`` ``{x, y, width, height}``.

        Returns :meth:`NucleusResult.to_dict`: ``count``, ``nuclei`` (id, bbox ``[xmin, ymin, xmax, ymax]``,
        centroid ``[x, y]``, GeoJSON polygon, area px², type), ``origin``, ``image_shape`` and, with
        ``include_labels``, ``labels`` (h, w) uint32 of the region. Coordinates are full-image pixels.
        A backend other than the default is built with no options, so one that needs weights
        (``hovernet``) is refused unless it is the default (configured with its checkpoint).
        """
        if not isinstance(include_labels, (bool, np.bool_)):
            raise InvalidInputError(f"include_labels must be true or false, got {include_labels!r}")
        result = segment_nuclei(image, backend=self._backend(backend), region=region, mpp=mpp, cache=self.cache)
        return result.to_dict(include_labels=bool(include_labels))
