"""Local Ray and Ray Serve for `colabel serve`: start, deploy the model services, stop; and, for the gateway
(`colabel models --attach`), the Serve applications of a cluster: wait for them, check them, never a local Ray.

Set up for a laptop or a 2-core machine: loopback only, no dashboard, a small
object store, no HTTP proxy (handles only), fractional CPUs per replica.

``quiet`` (the CLI without ``-v``) keeps Ray's routine lines off the terminal: Serve's INFO lines, the
FutureWarning about accelerator environment variables, the warning each ``serve.run`` logs because it asks
for HTTP proxies that this proxy-less Serve does not start, and the raylet's note that the Serve controller's
``graceful_shutdown`` call failed because the controller ended itself (what a graceful shutdown does).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

from colabel.errors import ColabelError

from .deployments import Autoscaling, build_deployment, get_deployment


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class _QuietServe(logging.Filter):
    """Serve's driver-side log without its INFO lines and without the warning that ``serve.run`` (which always
    asks for proxies on every node) logs when Serve runs without a proxy, as here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "client HTTP config differs" not in record.getMessage()


_QUIET_SERVE = _QuietServe()


def start_local_ray(*, address: str | None = None, num_cpus: int | None = None,
                    object_store_bytes: int = 256 * 2**20, quiet: bool = False) -> None:
    """Connect to ``address`` (a cluster) or start a local Ray on loopback, then start Serve without a proxy.

    ``quiet``: see the module's docstring; the filter stays on Serve's logger for this process.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    serve_logger = logging.getLogger("ray.serve")
    if quiet:
        serve_logger.addFilter(_QUIET_SERVE)
    else:
        serve_logger.removeFilter(_QUIET_SERVE)
    if not ray.is_initialized():
        with warnings.catch_warnings():
            if quiet:  # colabel relies on today's behaviour (replicas without GPUs do not see them)
                warnings.filterwarnings("ignore", message=".*accelerator visible devices", category=FutureWarning)
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
                         log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    serve.start(proxy_location="Disabled")


def deploy(names: list[str], *, options: dict | None = None, gpu: bool | None = None,
           autoscaling: dict[str, Autoscaling] | None = None) -> dict:
    """Deploy the named model services as Serve applications; returns name -> deployment handle."""
    from ray import serve

    gpu = gpu_available() if gpu is None else gpu
    handles = {}
    for name in names:
        spec = get_deployment(name).with_options(**(options or {}).get(name, {}))
        deployment = build_deployment(spec, gpu=gpu, autoscaling=(autoscaling or {}).get(name))
        handles[name] = serve.run(deployment.bind(**spec.options), name=name, route_prefix=None)
    return handles


RECONNECT_GRACE_S = 15


class AttachTimeout(ColabelError):
    """``attach`` gave up waiting for the cluster or its Serve applications (``--attach-timeout``)."""


class ClusterGone(ColabelError):
    """The Ray Client lost its cluster for good: no retry mends it (Ray does not reconnect after its grace
    period, and a cluster that was replaced does not know this client)."""


def never_start_local_ray(address: str) -> None:
    """Make sure that nothing in this process starts a local Ray instance; only ``address`` can be connected to.

    Ray's auto-init (``ray.get``, ``ray.wait`` & co. before ``ray.init``, which is what a Ray Client that has
    lost its cluster looks like) would start a local Ray inside the gateway: it is switched off, both for a
    ``ray`` imported later (``RAY_ENABLE_AUTO_CONNECT`` is read once, at import) and for the imported module.
    Serve connects with a bare ``ray.init()`` when it has no client yet: ``RAY_ADDRESS`` points that one at
    the cluster too, never at a new local instance.
    """
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    os.environ["RAY_ADDRESS"] = address
    import ray  # noqa: F401 - imports ray._private.auto_init_hook with the variable above

    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except ImportError:  # another Ray's layout: the variable, set before the first import, is what it reads
        pass


def _app_state(app) -> str | None:
    """``RUNNING``, ``DEPLOYING``, ... of an application in ``serve.status()``; None when it is not deployed."""
    if app is None:
        return None
    return str(getattr(app.status, "value", app.status))


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def attach(names: list[str], *, address: str, timeout: float = 0.0, progress=print, poll_s: float = 5.0,
           report_every_s: float = 30.0) -> dict:
    """Handles of Serve applications that a cluster (a KubeRay RayService) already runs; deploys nothing.

    Connects only to ``address`` (a ``ray://`` Ray Client address or a GCS address; never a local instance,
    see :func:`never_start_local_ray`), then waits until each application of ``names`` is RUNNING: the
    cluster may not answer yet and the RayService may still be pulling images or deploying when the gateway
    starts. ``timeout`` seconds at most (0: forever), saying with ``progress`` what it waits for at once and
    then every ``report_every_s`` seconds; :class:`AttachTimeout` after ``timeout``.
    """
    import time

    if not address or address.strip().lower() == "local":
        raise AttachTimeout(f"--ray-address {address!r} names no cluster: give the cluster's address, such as "
                            "ray://HEAD:10001")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # a Ray Client whose server went away retries for this long before it gives up (Ray's default: 30 s); a
    # cluster that was replaced never takes it back, and calls hang meanwhile: the gateway gives up sooner
    os.environ.setdefault("RAY_CLIENT_RECONNECT_GRACE_PERIOD", str(RECONNECT_GRACE_S))
    never_start_local_ray(address)
    import ray
    from ray import serve

    started = time.monotonic()
    deadline = started + timeout if timeout and timeout > 0 else float("inf")
    reported = [-float("inf")]

    def waiting(what: str) -> None:
        now = time.monotonic()
        if now >= deadline:
            raise AttachTimeout(f"gave up after {_elapsed(now - started)} (--attach-timeout {timeout:g}): {what}")
        if now - reported[0] >= report_every_s:
            reported[0] = now
            progress(f"waiting for the Ray cluster at {address}: {what} ({_elapsed(now - started)} so far)")

    while not ray.is_initialized():
        try:
            with warnings.catch_warnings():  # Ray's own "connection timed out" warning: said below, once
                warnings.simplefilter("ignore")
                ray.init(address=address, log_to_driver=False)
        except (ValueError, TypeError):  # an address Ray cannot parse: no wait mends it
            raise
        except Exception as exc:  # noqa: BLE001 - not reachable yet (the head pod is starting, DNS not there yet)
            waiting(f"it does not answer yet ({' '.join(str(exc).split())[:200]})")
            time.sleep(poll_s)
    while True:
        if not ray.is_initialized():
            raise ClusterGone(f"the Ray cluster at {address} went away while the gateway waited for it")
        try:
            applications = serve.status().applications
        except Exception as exc:  # noqa: BLE001 - Serve's controller not started yet on a new cluster
            waiting(f"Ray Serve does not answer yet ({' '.join(str(exc).split())[:200]})")
            time.sleep(poll_s)
            continue
        states = {name: _app_state(applications.get(name)) for name in names}
        missing = {name: state for name, state in states.items() if state != "RUNNING"}
        if not missing:
            break
        described = ", ".join(f"{name} {state or 'not deployed'}" for name, state in missing.items())
        if any(state is None for state in missing.values()):
            described += f" (the cluster runs: {', '.join(sorted(applications)) or 'no application'})"
        waiting(f"Serve application(s) not running yet: {described}")
        time.sleep(poll_s)
    return {name: serve.get_app_handle(name) for name in names}


def connection_lost() -> str | None:
    """Why this process's connection to Ray is gone for good, or None while it holds (or may come back): a
    local test, no call through the cluster. A Ray Client that lost its server tries to reconnect for
    ``RAY_CLIENT_RECONNECT_GRACE_PERIOD`` seconds, then reports itself disconnected."""
    import ray

    if ray.is_initialized():
        return None
    return "the Ray client has lost its connection to the cluster for good (it could not reconnect)"


def serve_health(names: list[str]) -> dict[str, str]:
    """One cheap call through the cluster: the Serve status of the applications ``names`` (name -> state).

    Raises :class:`ClusterGone` when the Ray Client has disconnected for good, and an ordinary exception when
    Serve does not answer or an application is no longer deployed (a health check that failed this time).
    """
    from ray import serve

    why = connection_lost()
    if why:
        raise ClusterGone(why)
    applications = serve.status().applications
    states = {name: _app_state(applications.get(name)) for name in names}
    gone = [name for name, state in states.items() if state is None]
    if gone:
        raise RuntimeError(f"Serve application(s) {', '.join(gone)} no longer deployed on the cluster")
    return states


def shutdown(*, applications: list[str] | None = None, grace_s: float = 1.0, quiet: bool = False) -> None:
    """Stop what this process started: all of Serve and Ray, or, on a shared cluster (``applications``
    given), only those Serve applications, then disconnect. ``quiet``: Ray's notes printed meanwhile (the
    raylet's ``graceful_shutdown failed`` line) are dropped.

    When this process started the Ray node and one of the node's processes exits within ``grace_s`` seconds
    (the stop signal went to the whole process group), Serve is not shut down gracefully: its controller would
    wait 30 s for replicas that are gone. ``ray.shutdown()`` stops what is left.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    # Ray prints what its raylet reports (a "(raylet)" line) on stdout, from a thread that ray.shutdown() ends
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        try:
            if not _local_node_stopping(grace_s):
                if applications is None:
                    serve.shutdown()
                else:
                    for name in applications:
                        serve.delete(name)
        finally:
            ray.shutdown()


def _local_node_stopping(grace_s: float) -> bool:
    """Whether a process of the Ray node this process started (``gcs_server``, ``raylet``, ``dashboard``, ...)
    has exited or exits within ``grace_s`` seconds: a SIGTERM to the whole process group (``timeout``,
    systemd's ``KillMode=control-group``) stops them and Serve's replicas with this process. False at once when
    connected to a cluster started elsewhere."""
    import time

    try:
        from ray._private import worker

        node = worker._global_node
        if node is None or not node.all_processes:
            return False
        deadline = time.monotonic() + grace_s
        while not node.dead_processes():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
    except (ImportError, AttributeError):  # another Ray's internals: take the ordinary path
        return False
