"""The gateway: registers model services as Hypha services, whatever runs them.

A *backend* runs one model service: :class:`LocalBackend` calls a plain object in this process (``--no-ray``
and tests), :class:`RayBackend` calls a Ray Serve deployment handle. :func:`register_model_services` exposes
each backend's ``rpc_functions`` as a Hypha service ``<prefix>-<name>``, plus ``deployment_status``. The model
classes never see Hypha or Ray.

A caller in the same process (the provider's :class:`~colabel.apps.provider.assist.ModelAssist`, when
``colabel serve`` runs the model services itself) finds the backend behind a service id with
:func:`in_process_backend` and calls it directly: the same backend, replicas and checks, without the
loopback through the Hypha server (two websocket legs and two msgpack round trips per call).

:class:`HealthMonitor` checks every 10 s that the model services answer (for Ray: ``serve.status()`` through
the cluster); after 3 failures in a row, or when the Ray Client has lost its cluster for good, it declares
them lost: calls waiting on them fail at once with a clear error and ``colabel models`` exits (status 1) so
that Kubernetes restarts it (``colabel serve`` runs one too, and goes on serving without the model services).
A second one, :func:`hypha_health_monitor`, checks the other side: that the Hypha server answers and still holds
the registered services; it declares the server lost once its checks have failed for a grace period (60 s) in a
row, longer than hypha-rpc's own reconnection usually takes. :class:`Heartbeat` is the file whose modification
time tells the probes that the checks pass. Every Ray call also has a deadline
(:meth:`~colabel.services.deployments.ModelDeployment.call_deadline`), and one that waits more than a few seconds
checks that its Serve application is still deployed (:class:`RayBackend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from colabel.errors import ColabelError

from .deployments import SHORT_CALL_S, get_deployment
from .wire import pack

logger = logging.getLogger(__name__)


class ModelServiceError(ColabelError):
    """A model replica failed while serving a call (it is restarted; the call may be retried)."""


HEALTH_INTERVAL_S = 10.0  # a health check (and a heartbeat) every 10 s: the chart's probes count on it
HEALTH_TIMEOUT_S = 10.0  # a check without an answer within 10 s has failed
HEALTH_FAILURES = 3  # failures in a row that declare the model services lost
HYPHA_GRACE_S = 60.0  # the Hypha server may fail its checks this long in a row (a reconnection) before it is lost
STATUS_CHECK_S = 5.0  # a Ray call waiting this long checks (then every 5 s) that its Serve application is deployed


class Unrecoverable(Exception):
    """A health check failure that no retry can mend (e.g. the Ray Client lost its cluster for good)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


async def in_daemon_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread of its own, awaited at most ``timeout`` seconds (:class:`TimeoutError`).

    For blocking Ray calls that may never return when the cluster is gone: a thread of the event loop's
    default executor would hang there, and ``asyncio.run`` waits for those threads before it returns; a
    daemon thread is left behind and ends with the process.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = {"error": exc}
        else:
            outcome = {"result": result}
        try:
            loop.call_soon_threadsafe(lambda: settle(**outcome))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"colabel-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g} s") from None


def ray_client_disconnected(exc: BaseException) -> bool:
    """Whether ``exc`` says that the Ray Client has lost (or is losing) its cluster."""
    text = str(exc)
    return isinstance(exc, ConnectionError) or "Ray Client is not connected" in text or (
        "Ray client has already been disconnected" in text)


class HealthMonitor:
    """Checks every ``interval`` seconds that the model services answer; declares them lost after ``failures``
    failed checks in a row (or, with ``grace``, once the checks have failed for ``grace`` seconds in a row), at
    once on an :class:`Unrecoverable` failure, or as soon as ``gone`` says so.

    ``check`` raises when the services do not answer. A blocking one (a Ray call) runs in a daemon thread, a
    coroutine function (a call through the Hypha connection) on the event loop, for at most ``timeout`` seconds
    either way. ``gone``, polled every second, is a cheap local test that returns a reason when the connection
    is lost for good (a Ray Client past its reconnect grace period), else None. ``target`` names what is
    checked in messages ("the Ray cluster at ray://.."). ``on_pass`` runs after each check that passed (the
    heartbeat); :attr:`passing` says whether the last check passed. Once lost, :attr:`lost` is set and
    :attr:`reason` is one sentence naming ``target``.
    """

    def __init__(self, check: Callable[[], Any], *, target: str, interval: float = HEALTH_INTERVAL_S,
                 timeout: float = HEALTH_TIMEOUT_S, failures: int = HEALTH_FAILURES, grace: float | None = None,
                 on_pass: Callable[[], None] | None = None, gone: Callable[[], str | None] | None = None,
                 gone_every_s: float = 1.0) -> None:
        self.check = check
        self.target = target
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self.grace = grace
        self.on_pass = on_pass
        self.gone = gone
        self.gone_every_s = gone_every_s
        self.lost = asyncio.Event()
        self.reason: str | None = None
        self.passing = True  # started after the target answered (the services were registered or attached)
        self.when_lost = "the gateway is restarting, retry in a minute"  # what callers are told to do once lost

    def declare_lost(self, why: str) -> None:
        if not self.lost.is_set():
            self.reason = f"{self.target} does not answer: {why}"
            self.lost.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the services are declared lost meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.lost.wait(), max(0.0, seconds))

    async def _watch(self) -> None:
        while not self.lost.is_set():
            await self._sleep(self.gone_every_s)
            try:
                why = self.gone()
            except Exception:  # noqa: BLE001 - the periodic check decides then
                why = None
            if why:
                self.declare_lost(why)

    async def _check_once(self) -> None:
        if not inspect.iscoroutinefunction(self.check):
            await in_daemon_thread(self.check, self.timeout)
            return
        try:
            await asyncio.wait_for(self.check(), self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer within {self.timeout:g} s") from None

    async def run(self) -> None:
        """Check until the services are lost (then return) or the task is cancelled."""
        watcher = asyncio.create_task(self._watch()) if self.gone is not None else None
        failed, last, failing_since = 0, "", 0.0
        next_check = time.monotonic() + self.interval
        try:
            while not self.lost.is_set():
                await self._sleep(next_check - time.monotonic())
                next_check += self.interval
                if self.lost.is_set():
                    break
                started = time.monotonic()
                try:
                    await self._check_once()
                except Unrecoverable as exc:
                    self.passing = False
                    self.declare_lost(one_line(exc))
                    break
                except Exception as exc:  # noqa: BLE001 - any failure of the check, a timeout included
                    self.passing = False
                    failed, last = failed + 1, one_line(exc)
                    failing_since = started if failed == 1 else failing_since
                    failing_for = time.monotonic() - failing_since
                    if self.grace is None and failed >= self.failures:
                        self.declare_lost(f"{failed} health checks failed in a row, {self.interval:g} s apart "
                                          f"(the last: {last})")
                        break
                    if self.grace is not None and failing_for >= self.grace:
                        self.declare_lost(f"its health checks failed for {failing_for:.1f} s in a row (grace period "
                                          f"{self.grace:g} s; the last: {last})")
                        break
                    if self.grace is None:
                        logger.warning("health check %d of %d in a row failed: %s: %s", failed, self.failures,
                                       self.target, last)
                    else:
                        logger.warning("health check failed (%d in a row, for %.1f s of a %g s grace period): %s: %s",
                                       failed, failing_for, self.grace, self.target, last)
                        next_check = min(next_check, failing_since + self.grace)  # lost when the grace ends
                    next_check = max(next_check, time.monotonic())
                else:
                    if failed:
                        logger.warning("health check passed again: %s", self.target)
                    failed, self.passing = 0, True
                    if self.on_pass is not None and not self.lost.is_set():
                        self.on_pass()
        finally:
            if watcher is not None:
                watcher.cancel()


class Heartbeat:
    """A file whose modification time says that the gateway is registered on Hypha and its model services
    answer: written once they are registered, rewritten after each passing health check (every 10 s) while the
    last check of every monitor passed (:meth:`follow`), and removed at start and at exit. Probes read its age:
    ready under 30 s, alive under 60 s.

    Each write is atomic (a temporary file beside it, renamed onto it): a probe never sees it half written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().absolute()
        self._failing = False

    def check(self) -> None:
        """Refuse, in one sentence, a path whose file cannot be written (before anything starts)."""
        folder = self.path.parent
        if not folder.is_dir():
            raise ColabelError(f"--heartbeat {self.path}: folder {folder} does not exist")
        if self.path.is_dir():
            raise ColabelError(f"--heartbeat {self.path} is a folder; give a file name in it")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ColabelError(f"--heartbeat {self.path}: folder {folder} is not writable")

    def beat(self) -> None:
        from colabel.files import atomic_write

        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            atomic_write(self.path, f"{stamp} pid {os.getpid()}\n".encode())
        except OSError as exc:  # the probes then see a stale file: said once, until a write works again
            if not self._failing:
                logger.warning("cannot write the heartbeat file %s: %s", self.path, exc)
            self._failing = True
        else:
            self._failing = False

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove the heartbeat file %s: %s", self.path, exc)

    def follow(self, *monitors: HealthMonitor) -> None:
        """Beat after each check of ``monitors`` that passes while the last check of every one passed: the
        model services and the Hypha server both answer."""
        def beat() -> None:
            if all(m.passing and not m.lost.is_set() for m in monitors):
                self.beat()

        for monitor in monitors:
            monitor.on_pass = beat


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
    """Calls a Ray Serve deployment through its handle; maps replica deaths to :class:`ModelServiceError`.

    ``app`` is the Serve application (default ``name``; ``colabel serve`` and ``colabel models`` deploy
    ``<prefix>-<name>``). Every call has a deadline: ``deadlines[method]`` seconds when given, else the
    service's :meth:`~colabel.services.deployments.ModelDeployment.call_deadline` (long for ``embed``,
    ``generate``, an ONNX export, ..., short for ``segment``, ``info``, ...); past it the call is cancelled and
    fails with ``ModelServiceError: <name>.<method> did not answer within N s``. A call that has waited
    ``status_check_s`` seconds checks (then every ``status_check_s``) that the application is still deployed,
    and fails at once when it is not (Ray would let it wait for ever); so do the calls that follow, until a
    check finds it deployed again.

    With a ``monitor`` (``colabel models``, ``colabel serve``), a call fails at once with the monitor's reason
    when the cluster is declared lost, also a call already waiting for a replica (which Ray would otherwise let
    hang until the caller's timeout, retrying a replica it cannot reach).
    """

    def __init__(self, name: str, handle: Any, monitor: HealthMonitor | None = None, *, app: str | None = None,
                 deadlines: dict[str, float] | None = None, status_check_s: float = STATUS_CHECK_S) -> None:
        self.name = name
        self.handle = handle
        self.monitor = monitor
        self.app = app or name
        self.deadlines = dict(deadlines or {})
        self.status_check_s = status_check_s
        self._not_deployed_at: float | None = None  # when a check last found the application not deployed
        self._checked: tuple[float, bool] | None = None  # (when, deployed) of the last check
        self._checking: asyncio.Future | None = None  # the check in flight, shared by the calls waiting meanwhile

    def deadline(self, method: str) -> float:
        """Seconds a call of ``method`` may take."""
        if method in self.deadlines:
            return float(self.deadlines[method])
        try:
            return get_deployment(self.name).call_deadline(method)
        except KeyError:
            return SHORT_CALL_S

    def _lost_error(self, method: str) -> ModelServiceError:
        return ModelServiceError(f"{self.name}.{method} cannot run: {self.monitor.reason}; {self.monitor.when_lost}")

    def _not_deployed_error(self, method: str) -> ModelServiceError:
        return ModelServiceError(f"{self.name}.{method} cannot run: the Serve application {self.app!r} of the "
                                 f"{self.name} model service is no longer deployed on Ray (NOT_DEPLOYED: deleted, or "
                                 "Serve was restarted); it answers again once the application is deployed again "
                                 "(restart the colabel command that deployed it)")

    async def _deployed(self) -> bool:
        """Whether ``serve.status()`` lists the application (True when Serve does not answer: not known to be gone).
        One check at a time per backend, its answer shared by the calls waiting meanwhile and for a moment after."""
        if self._checked is not None and time.monotonic() - self._checked[0] < self.status_check_s / 2:
            return self._checked[1]
        loop = asyncio.get_running_loop()
        if self._checking is None or self._checking.done() or self._checking.get_loop() is not loop:
            self._checking = asyncio.ensure_future(self._read_deployed())
        return await asyncio.shield(self._checking)

    async def _read_deployed(self) -> bool:
        from . import ray_runtime

        try:
            deployed = await in_daemon_thread(lambda: self.app in ray_runtime.serve_status().applications,
                                              HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no answer is no proof that the application is gone
            return True
        self._checked = (time.monotonic(), deployed)
        self._not_deployed_at = None if deployed else self._checked[0]
        return deployed

    async def _wait(self, response: Any, method: str) -> Any:
        """The response's result; :class:`ModelServiceError` (the response cancelled) past the method's deadline,
        once the application is found not deployed, or when the monitor declares the cluster lost."""
        async def result():
            return await response

        seconds = self.deadline(method)
        started = time.monotonic()
        next_check = started + self.status_check_s
        call = asyncio.ensure_future(result())
        lost = asyncio.ensure_future(self.monitor.lost.wait()) if self.monitor is not None else None
        failure: ModelServiceError | None = None
        try:
            while failure is None:
                wake = min(started + seconds, next_check) - time.monotonic()
                await asyncio.wait({call} if lost is None else {call, lost}, timeout=max(0.0, wake),
                                   return_when=asyncio.FIRST_COMPLETED)
                if call.done():
                    return call.result()
                if lost is not None and lost.done():
                    failure = self._lost_error(method)
                elif time.monotonic() >= started + seconds:
                    failure = ModelServiceError(
                        f"{self.name}.{method} did not answer within {seconds:g} s (its replica is overloaded or "
                        "hung; Serve replaces a hung replica within about 40 s); retry later")
                elif time.monotonic() >= next_check:
                    if not await self._deployed():
                        failure = self._not_deployed_error(method)
                    next_check = time.monotonic() + self.status_check_s
        finally:
            if lost is not None:
                lost.cancel()
            if not call.done():
                call.cancel()
                # Ray's response answers the cancellation with its own RequestCancelledError: nobody reads it
                call.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            response.cancel()
        except Exception:  # noqa: BLE001 - the cluster is gone: nothing to cancel there
            pass
        raise failure

    async def call(self, method: str, *args: Any) -> Any:
        from ray import exceptions as ray_errors

        if self.monitor is not None and self.monitor.lost.is_set():
            raise self._lost_error(method)
        if self._not_deployed_at is not None and time.monotonic() - self._not_deployed_at < self.status_check_s:
            raise self._not_deployed_error(method)  # found gone a moment ago: no need to wait again
        try:
            response = getattr(self.handle, method).remote(*args)
            return await self._wait(response, method)
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
        except Exception as exc:
            if not ray_client_disconnected(exc):
                raise
            if self.monitor is not None:
                if "not connected" in str(exc) or "already been disconnected" in str(exc):
                    self.monitor.declare_lost(f"the Ray client has lost its connection ({one_line(exc)})")
                if self.monitor.lost.is_set():
                    raise self._lost_error(method) from None
            raise ModelServiceError(f"{self.name}.{method} cannot reach the Ray cluster ({one_line(exc)}); retry "
                                    "in a minute") from None

    async def status(self) -> dict:
        from . import ray_runtime

        def read() -> dict:
            app = ray_runtime.serve_status().applications.get(self.app)
            if app is None:
                return {"mode": "ray", "status": "NOT_DEPLOYED", "replicas": {}}
            deployment = app.deployments.get(self.name)
            return {
                "mode": "ray",
                "status": str(app.status.value if hasattr(app.status, "value") else app.status),
                "replicas": {str(k.value if hasattr(k, "value") else k): v
                             for k, v in (deployment.replica_states if deployment else {}).items()},
            }

        if self.monitor is not None and self.monitor.lost.is_set():
            raise self._lost_error("deployment_status")
        try:
            return await in_daemon_thread(read, HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise ModelServiceError(f"{self.name}.deployment_status: the Ray cluster did not answer within "
                                    f"{HEALTH_TIMEOUT_S:g} s") from None


# full service id -> the backend registered under it by this process (weak: the registration keeps it alive)
_REGISTERED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def in_process_backend(service_id: str) -> Backend | None:
    """The backend that :func:`register_model_services` registered in this process as ``service_id``
    (the full id it returned), or None when the service runs elsewhere."""
    return _REGISTERED.get(service_id)


def hypha_health_monitor(server: Any, server_url: str, service_ids: Any = (), *, grace: float = HYPHA_GRACE_S,
                         on_pass: Callable[[], None] | None = None,
                         interval: float = HEALTH_INTERVAL_S) -> HealthMonitor:
    """The health check of the Hypha side: cheap calls through the connection ``server`` (to ``server_url``)
    that the server answers, and that the services this process registered there (``service_ids``, full ids)
    are still registered (``get_service_info`` of each; ``echo`` without services).

    hypha-rpc reconnects by itself and registers the services again; the checks fail meanwhile. The server is
    declared lost ("the Hypha server at URL does not answer: ...") once they have failed for ``grace`` seconds
    in a row. Checked every ``min(interval, grace / 4)`` (10 s by default) for at most ``min(10 s, grace / 2)``.

    Each check asks the connection for the workspace manager of the moment (one round trip): after a restart
    of the server the manager has a new id, and hypha-rpc 0.21 leaves ``server``'s own methods addressed to the
    old one after the first reconnection (calls to it never answer), while the services work again.
    """
    ids = list(service_ids)

    async def check() -> None:
        manager = await server.rpc.get_manager_service({"timeout": HEALTH_TIMEOUT_S, "case_conversion": "snake"},
                                                       max_retries=1)
        if not ids:
            await manager.echo("health")
        for service_id in ids:
            try:
                await manager.get_service_info(service_id)
            except Exception as exc:  # a remote error's last line says why (KeyError: 'Service not found: ...')
                why = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
                raise RuntimeError(f"get_service_info({service_id}): {why[-1].strip()}") from None

    return HealthMonitor(check, target=f"the Hypha server at {server_url}", interval=min(interval, grace / 4),
                         timeout=min(HEALTH_TIMEOUT_S, grace / 2), grace=grace, on_pass=on_pass)


def _plain(value: Any) -> Any:
    """``value`` with hypha-rpc's ``ObjectProxy`` dicts (a ``dict`` subclass) made plain dicts again, so that a
    model's error sentence about a wrong argument names ``dict``, not a class of the transport; anything else,
    and a list holding no such dict, is returned as it is."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()} if type(value) is not dict or any(
            isinstance(v, dict | list) for v in value.values()) else value
    if type(value) is list:
        if all(type(v) in (int, float, str, bool) or v is None for v in value):
            return value
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def _parameters(cls: type, method: str) -> list[str]:
    """The positional parameters of ``cls.method`` after ``self``, for error sentences."""
    try:
        return [p.name for p in list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (AttributeError, TypeError, ValueError):
        return []


def _forward(backend: Backend, method: str, cls: type | None = None):
    async def call(*args, **kwargs):
        if kwargs:  # hypha-rpc passes a caller's keywords through; the backends take positional arguments only
            order = _parameters(cls, method) if cls is not None else []
            raise Exception(f"InvalidInputError: {backend.name}.{method} takes positional arguments only, got "
                            f"keyword argument(s) {', '.join(sorted(map(str, kwargs)))}"
                            + (f"; pass them in this order: {', '.join(order)}" if order else ""))
        try:
            return await backend.call(method, *(_plain(a) for a in args))
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
        cls = get_deployment(name).load_class()
        functions = {m: _forward(backend, m, cls) for m in cls.rpc_functions}

        async def deployment_status(_backend=backend):
            return {**await _backend.status(), "uptime_s": round(time.time() - started, 1)}

        async def call_packed(method, *args, _backend=backend, _allowed=frozenset(functions), _cls=cls):
            """``method(*args)`` with its outlines packed as arrays (colabel.services.wire), for colabel's
            own Python callers: the same result, decoded without hypha-rpc's per-coordinate cost."""
            if method not in _allowed:
                raise Exception(f"InvalidInputError: unknown function {method!r}; use one of {sorted(_allowed)}")
            return pack(await _forward(_backend, method, _cls)(*args))

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
