"""Local Ray and Ray Serve for `colabel serve`: start, deploy the model services, stop.

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


def attach(names: list[str], *, address: str, timeout: float = 600.0, progress=print) -> dict:
    """Handles of Serve applications that a cluster (a KubeRay RayService) already runs; deploys nothing.

    Waits up to ``timeout`` seconds for each application to be RUNNING (the RayService may still be
    deploying when the gateway starts).
    """
    import time

    import ray
    from ray import serve

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + timeout
    handles = {}
    for name in names:
        while True:
            app = serve.status().applications.get(name)
            state = getattr(getattr(app, "status", None), "value", getattr(app, "status", None))
            if state == "RUNNING":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve application {name!r} is not running after {timeout:.0f} s (status {state})")
            progress(f"waiting for Serve application {name!r} (status {state}) ...")
            time.sleep(5)
        handles[name] = serve.get_app_handle(name)
    return handles


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
