"""The gateway: registers model services as Hypha services, whatever runs them.

A *backend* runs one model service: :class:`LocalBackend` calls a plain object in this process (``--no-ray``
and tests), :class:`RayBackend` calls a Ray Serve deployment handle. :func:`register_model_services` exposes
each backend's ``rpc_functions`` as a Hypha service ``<prefix>-<name>``, plus ``deployment_status``. The model
classes never see Hypha or Ray.

A caller in the same process (the provider's :class:`~colabel.apps.provider.assist.ModelAssist`, when
``colabel serve`` runs the model services itself) finds the backend behind a service id with
:func:`in_process_backend` and calls it directly: the same backend, replicas and checks, without the
loopback through the Hypha server (two websocket legs and two msgpack round trips per call).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Protocol

from colabel.errors import ColabelError

from .deployments import get_deployment
from .wire import pack

logger = logging.getLogger(__name__)


class ModelServiceError(ColabelError):
    """A model replica failed while serving a call (it is restarted; the call may be retried)."""


class Backend(Protocol):
    name: str

    async def call(self, method: str, *args: Any) -> Any: ...

    async def status(self) -> dict: ...


class LocalBackend:
    """Runs a model-service object in this process, one call at a time per object, off the event loop."""

    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj
        self._lock = asyncio.Lock()

    async def call(self, method: str, *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(getattr(self.obj, method), *args)

    async def status(self) -> dict:
        return {"mode": "in-process", "status": "HEALTHY", "replicas": {"RUNNING": 1}}


class RayBackend:
    """Calls a Ray Serve deployment through its handle; maps replica deaths to :class:`ModelServiceError`."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        from ray import exceptions as ray_errors

        try:
            return await getattr(self.handle, method).remote(*args)
        except ColabelError:
            raise
        except (ray_errors.RayActorError, ray_errors.ActorDiedError, ray_errors.ActorUnavailableError) as exc:
            raise ModelServiceError(
                f"the {self.name} replica serving this call stopped ({type(exc).__name__}); "
                "it is being restarted, retry in a few seconds"
            ) from None
        except ray_errors.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, ColabelError):
                raise cause from None
            raise ModelServiceError(f"{self.name}.{method} failed: {cause or exc}") from None

    async def status(self) -> dict:
        from ray import serve

        def read() -> dict:
            app = serve.status().applications.get(self.name)
            if app is None:
                return {"mode": "ray", "status": "NOT_DEPLOYED", "replicas": {}}
            deployment = app.deployments.get(self.name)
            return {
                "mode": "ray",
                "status": str(app.status.value if hasattr(app.status, "value") else app.status),
                "replicas": {str(k.value if hasattr(k, "value") else k): v
                             for k, v in (deployment.replica_states if deployment else {}).items()},
            }

        return await asyncio.to_thread(read)


# full service id -> the backend registered under it by this process (weak: the registration keeps it alive)
_REGISTERED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def in_process_backend(service_id: str) -> Backend | None:
    """The backend that :func:`register_model_services` registered in this process as ``service_id``
    (the full id it returned), or None when the service runs elsewhere."""
    return _REGISTERED.get(service_id)


def _forward(backend: Backend, method: str):
    async def call(*args):
        try:
            return await backend.call(method, *args)
        except ColabelError as exc:
            raise Exception(f"{type(exc).__name__}: {exc}") from None

    call.__name__ = method
    return call


async def register_model_services(server: Any, backends: dict[str, Backend], *, prefix: str = "colabel",
                                  visibility: str = "protected") -> dict[str, str]:
    """Register each backend as the Hypha service ``<prefix>-<name>``; returns name -> full service id.

    ``visibility="protected"`` keeps model compute to clients of the workspace (the provider, the gateway's
    own users); annotators reach models only through their session's annotator service.
    """
    ids = {}
    started = time.time()
    for name, backend in backends.items():
        spec = get_deployment(name)
        functions = {m: _forward(backend, m) for m in spec.load_class().rpc_functions}

        async def deployment_status(_backend=backend):
            return {**await _backend.status(), "uptime_s": round(time.time() - started, 1)}

        async def call_packed(method, *args, _backend=backend, _allowed=frozenset(functions)):
            """``method(*args)`` with its outlines packed as arrays (colabel.services.wire), for colabel's
            own Python callers: the same result, decoded without hypha-rpc's per-coordinate cost."""
            if method not in _allowed:
                raise Exception(f"InvalidInputError: unknown function {method!r}; use one of {sorted(_allowed)}")
            return pack(await _forward(_backend, method)(*args))

        info = await server.register_service({
            "id": f"{prefix}-{name}",
            "name": f"colabel {name}",
            "description": f"colabel model service {name!r}",
            "config": {"visibility": visibility},
            **functions,
            "deployment_status": deployment_status,
            "call_packed": call_packed,
        })
        ids[name] = info["id"] if isinstance(info, dict) else info.id
        _REGISTERED[ids[name]] = backend
        logger.info("registered model service %s", ids[name])
    return ids
