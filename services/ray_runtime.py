"""Local Ray and Ray Serve for `colabel serve`: start, deploy the model services, stop; and, for the gateway
(`colabel models --attach`), the Serve applications of a cluster: wait for them, check them, never a local Ray.

Set up for a laptop or a 2-core machine: loopback only, no dashboard, a small
object store, no HTTP proxy (handles only), fractional CPUs per replica. On a Ray node this process started,
:func:`deploy` caps each deployment's ``max_replicas`` so that all of them at their maxima fit the node's CPUs
(and GPUs), and logs what it capped: the autoscaling maxima of ``MODEL_DEPLOYMENTS`` need a cluster.

Serve applications are named ``<prefix>-<name>`` (``colabel serve`` and ``colabel models`` pass
``--models-prefix``), so two colabel processes on one cluster keep theirs apart. Each deployed application is
recorded in the cluster's key-value store with its owner (the Ray job of this process): :func:`deploy` refuses,
in one sentence and before deploying anything, an application of that name that another live process deployed
(or that colabel did not deploy), and :func:`shutdown` deletes only the applications this process deployed and
still owns. An application whose owner has exited (killed without its cleanup) is taken over.

``quiet`` (the CLI without ``-v``) keeps Ray's routine lines off the terminal: Serve's INFO lines, the
FutureWarning about accelerator environment variables, the warning each ``serve.run`` logs because it asks
for HTTP proxies that this proxy-less Serve does not start, and the raylet's note that the Serve controller's
``graceful_shutdown`` call failed because the controller ended itself (what a graceful shutdown does).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import socket
import threading
import warnings
from dataclasses import replace

from colabel.errors import ColabelError

from .deployments import Autoscaling, ModelDeployment, build_deployment, get_deployment

logger = logging.getLogger(__name__)

#: Namespace of the cluster's key-value store (GCS) holding who deployed each Serve application.
OWNERS_NAMESPACE = "colabel"


class ApplicationTaken(ColabelError):
    """:func:`deploy` refused: the cluster runs a Serve application of that name that this process did not deploy."""


#: Serve applications this process deployed: name -> (resources of one replica, max_replicas).
_DEPLOYED: dict[str, tuple[dict[str, float], int]] = {}

#: Set by :func:`shutdown` and :func:`disconnect`, cleared by :func:`start_local_ray` and :func:`attach`: this
#: process has let go of Ray. A Ray or Serve call made after it (a health check still running in a worker thread)
#: would start a new local Ray instance (Serve calls ``ray.init()`` when it has no connection);
#: :func:`connection_lost` says so first.
_LET_GO = threading.Event()


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

    _LET_GO.clear()
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


def application_name(name: str, prefix: str | None = None) -> str:
    """The Serve application of the model service ``name``: ``<prefix>-<name>``, or ``name`` without a prefix (as
    the Helm chart's RayService names them, and what ``colabel models --attach`` looks for)."""
    return f"{prefix}-{name}" if prefix else name


def replica_resources(spec: ModelDeployment, *, gpu: bool) -> dict[str, float]:
    """What one replica of ``spec`` reserves: ``{"CPU": ..., "GPU": ...}``."""
    options = spec.ray_actor_options(gpu=gpu)
    return {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"])}


def fit_max_replicas(demands: dict[str, tuple[Autoscaling, dict[str, float]]],
                     capacity: dict[str, float]) -> dict[str, Autoscaling]:
    """Lower each ``max_replicas`` so that every deployment at its maximum fits ``capacity`` together.

    ``demands`` maps a name to (its autoscaling, the resources of one replica), in order of priority. Every
    deployment keeps its ``min_replicas``; the room left is handed out one replica at a time, in turn (the first
    name first), to the deployments below their maxima whose replica still fits. Returns the new autoscaling of
    every name (unchanged where everything fits).
    """
    free = dict(capacity)
    counts = {}
    for name, (scaling, needs) in demands.items():
        counts[name] = scaling.min_replicas
        for resource, amount in needs.items():
            free[resource] = free.get(resource, 0.0) - amount * scaling.min_replicas
    grown = True
    while grown:
        grown = False
        for name, (scaling, needs) in demands.items():
            if counts[name] >= scaling.max_replicas:
                continue
            if all(amount <= free.get(resource, 0.0) + 1e-9 for resource, amount in needs.items() if amount):
                counts[name] += 1
                for resource, amount in needs.items():
                    free[resource] = free.get(resource, 0.0) - amount
                grown = True
    return {name: replace(scaling, max_replicas=max(counts[name], scaling.min_replicas, 1))
            for name, (scaling, _) in demands.items()}


def _local_capacity(excluding: set[str]) -> dict[str, float]:
    """CPUs and GPUs of the local Ray node, less what the other applications this process deployed may take at
    their maxima."""
    import ray

    total = ray.cluster_resources()
    capacity = {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}
    for app, (needs, most) in _DEPLOYED.items():
        if app not in excluding:
            for resource, amount in needs.items():
                capacity[resource] = capacity.get(resource, 0.0) - amount * most
    return capacity


def _cap_to_local_node(specs: dict[str, ModelDeployment], scaling: dict[str, Autoscaling], *,
                       gpu: bool, apps: set[str]) -> dict[str, Autoscaling]:
    """:func:`fit_max_replicas` on the local node's resources; logs what it capped, and minima that do not fit."""
    needs = {name: replica_resources(spec, gpu=gpu) for name, spec in specs.items()}
    capacity = _local_capacity(apps)
    capped = fit_max_replicas({name: (scaling[name], needs[name]) for name in specs}, capacity)
    lowered = [f"{name} {scaling[name].max_replicas} -> {capped[name].max_replicas}" for name in specs
               if capped[name].max_replicas < scaling[name].max_replicas]
    room = max(capacity['CPU'], 0.0)
    cpus = f"{room:g} CPU{'s' if room != 1 else ''}"
    if lowered:
        logger.warning("the local Ray node has room for %s of model replicas: max_replicas capped so that every "
                       "deployment at its maximum fits: %s (the autoscaling maxima need a cluster: --ray-address)",
                       cpus, ", ".join(lowered))
    minimum = sum(needs[name]["CPU"] * scaling[name].min_replicas for name in specs)
    if minimum > capacity["CPU"] + 1e-9:
        logger.warning("the model deployments' minimum replicas need %g CPUs and the local Ray node has room for %s: "
                       "some replicas will never start", minimum, cpus)
    return capped


def started_local_node() -> bool:
    """Whether this process started the Ray node it is connected to (``start_local_ray`` without an address)."""
    try:
        from ray._private import worker

        node = worker._global_node
        return bool(node is not None and node.all_processes)
    except (ImportError, AttributeError):  # another Ray's internals: assume a cluster
        return False


def _owner_key(app: str) -> str:
    return f"serve-application:{app}"


def _this_owner() -> dict:
    import ray

    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"job": ray.get_runtime_context().get_job_id(), "pid": os.getpid(), "host": socket.gethostname(),
            "since": since}


def _read_owner(app: str) -> dict | None:
    """Who deployed ``app``, as recorded by :func:`deploy`; None without a record, ``{}`` for an unreadable one."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_owner_key(app), namespace=OWNERS_NAMESPACE)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _job_table() -> list[dict]:
    from ray._private import state

    return state.jobs()


def _job_alive(job: str | None) -> bool | None:
    """Whether the Ray job ``job`` (a driver) still runs; None when that cannot be told."""
    import ray

    if not job:
        return None
    try:
        if ray.util.client.ray.is_connected():  # a Ray Client: the job table is read on the cluster
            table = ray.get(ray.remote(num_cpus=0)(_job_table).remote(), timeout=60)
        else:
            table = _job_table()
    except Exception:  # noqa: BLE001 - not known
        return None
    entry = next((j for j in table if j.get("JobID") == job), None)
    return entry is not None and not entry.get("IsDead", True)


def _taken(app: str, record: dict | None, alive: bool | None) -> str:
    if record is None:
        return (f"the Ray cluster already runs a Serve application {app!r} that colabel did not deploy; give this "
                "command another --models-prefix, or delete that application first")
    who = f"pid {record.get('pid', '?')} on {record.get('host', '?')}, since {record.get('since', '?')}"
    still = "" if alive else " (whether it still runs cannot be told)"
    return (f"the Ray cluster already runs the Serve application {app!r}, deployed by another colabel process "
            f"({who}){still}; give this command another --models-prefix, or stop that process first")


def _claim(apps: list[str], owner: dict) -> None:
    """Record ``owner`` as the owner of each application of ``apps``, or refuse them all (:class:`ApplicationTaken`)
    when one runs, or is claimed, by another live process."""
    from ray import serve
    from ray.experimental import internal_kv

    running = set(serve.status().applications)
    refused, take = [], {}
    for app in apps:
        record = _read_owner(app)
        if record is not None and record.get("job") == owner["job"]:
            take[app] = True  # this process's own, deployed again
        elif record is not None:
            alive = _job_alive(record.get("job"))
            if alive is False:
                logger.warning("Serve application %s was deployed by a colabel process that has exited (pid %s on %s): "
                               "deploying it again", app, record.get("pid", "?"), record.get("host", "?"))
                take[app] = True
            else:
                refused.append(_taken(app, record, alive))
        elif app in running:
            refused.append(_taken(app, None, None))
        else:
            take[app] = False  # nobody's: claimed without overwriting, in case another process claims it meanwhile
    if refused:
        raise ApplicationTaken(refused[0])
    value = json.dumps(owner)
    claimed = []
    for app, overwrite in take.items():
        already = internal_kv._internal_kv_put(_owner_key(app), value, overwrite=overwrite, namespace=OWNERS_NAMESPACE)
        if already and not overwrite:  # another process claimed it since the check above
            for mine in claimed:
                _release(mine, owner["job"])
            raise ApplicationTaken(_taken(app, _read_owner(app), True))
        claimed.append(app)


def _release(app: str, job: str | None) -> bool:
    """Forget the owner record of ``app`` when it names ``job``; returns whether it did (or there was none)."""
    from ray.experimental import internal_kv

    record = _read_owner(app)
    if record is not None and record.get("job") != job:
        return False
    internal_kv._internal_kv_del(_owner_key(app), namespace=OWNERS_NAMESPACE)
    return True


def deploy(names: list[str], *, options: dict | None = None, gpu: bool | None = None,
           autoscaling: dict[str, Autoscaling] | None = None, prefix: str | None = None,
           cap: bool | None = None) -> dict:
    """Deploy the named model services as the Serve applications ``<prefix>-<name>`` (``name`` without a prefix);
    returns name -> deployment handle.

    Refuses (:class:`ApplicationTaken`, before deploying any) an application of that name that another live
    process deployed. ``cap`` (default: when this process started the Ray node) lowers ``max_replicas`` to what
    the node can hold (:func:`fit_max_replicas`), logging what it capped.
    """
    from ray import serve

    gpu = gpu_available() if gpu is None else gpu
    apps = {name: application_name(name, prefix) for name in names}
    specs = {name: get_deployment(name).with_options(**(options or {}).get(name, {})) for name in names}
    scaling = {name: (autoscaling or {}).get(name) or specs[name].autoscaling for name in names}
    if started_local_node() if cap is None else cap:
        scaling = _cap_to_local_node(specs, scaling, gpu=gpu, apps=set(apps.values()))
    owner = _this_owner()
    _claim(list(apps.values()), owner)
    handles = {}
    try:
        for name in names:
            deployment = build_deployment(specs[name], gpu=gpu, autoscaling=scaling[name])
            handles[name] = serve.run(deployment.bind(**specs[name].options), name=apps[name], route_prefix=None)
            _DEPLOYED[apps[name]] = (replica_resources(specs[name], gpu=gpu), scaling[name].max_replicas)
    except BaseException:
        for name in names:
            if name not in handles:
                with contextlib.suppress(Exception):
                    _release(apps[name], owner["job"])
        raise
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
    os.environ["RAY_ADDRESS"] = address
    _no_auto_init()


def _no_auto_init() -> None:
    """Switch Ray's auto-init off in this process: a Ray call without a connection (``ray.get``, ``ray.wait`` & co.)
    raises instead of starting a local Ray instance; an explicit ``ray.init`` still connects or starts one."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
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
    _LET_GO.clear()
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
    ``RAY_CLIENT_RECONNECT_GRACE_PERIOD`` seconds, then reports itself disconnected. Once :func:`shutdown` has
    begun it is gone too: call no Ray or Serve function then (Serve would start a new local Ray to answer it)."""
    import ray

    if _LET_GO.is_set():
        return "this process has shut its Ray connection down (it is stopping)"
    if ray.is_initialized():
        return None
    return "the Ray client has lost its connection to the cluster for good (it could not reconnect)"


def serve_status():
    """``serve.status()``, unless this process's connection to Ray is gone (:func:`connection_lost`: lost for good,
    or let go while stopping, when Serve would start a new local Ray to answer): then :class:`ClusterGone`."""
    from ray import serve

    why = connection_lost()
    if why:
        raise ClusterGone(why)
    return serve.status()


def serve_health(names: list[str]) -> dict[str, str]:
    """One cheap call through the cluster: the Serve status of the applications ``names`` (name -> state).

    Raises :class:`ClusterGone` when the Ray Client has disconnected for good, and an ordinary exception when
    Serve does not answer or an application is no longer deployed (a health check that failed this time).
    """
    applications = serve_status().applications
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
    _let_go()
    # Ray prints what its raylet reports (a "(raylet)" line) on stdout, from a thread that ray.shutdown() ends
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        try:
            if not _local_node_stopping(grace_s):
                if applications is None:
                    serve.shutdown()
                else:
                    delete_applications(applications)
        finally:
            _DEPLOYED.clear()
            ray.shutdown()


def disconnect() -> None:
    """Disconnect from a cluster this process did not start (``colabel models --attach``), or stop the local node
    at once (a lost cluster): no Ray or Serve call of this process runs after it (:func:`connection_lost`)."""
    import ray

    _let_go()
    ray.shutdown()


def _let_go() -> None:
    """Before this process stops Ray or disconnects: no call of its other threads may start a new local Ray then,
    neither colabel's health checks (:func:`connection_lost`) nor Serve's own (its handles' router thread pushes
    autoscaling metrics with ``ray.wait``, which Ray's auto-init answers by starting a local instance)."""
    _LET_GO.set()
    _no_auto_init()


def delete_applications(applications: list[str]) -> list[str]:
    """Delete those of ``applications`` that this process deployed and still owns (never another process's of the
    same name); returns the names deleted."""
    import ray
    from ray import serve

    job = ray.get_runtime_context().get_job_id()
    deleted = []
    for name in applications:
        if name not in _DEPLOYED:
            logger.info("Serve application %s was not deployed by this process: left running", name)
            continue
        record = _read_owner(name)
        if record is not None and record.get("job") != job:
            logger.warning("Serve application %s is now deployed by another colabel process (pid %s): left running",
                           name, record.get("pid", "?"))
        else:
            serve.delete(name)
            _release(name, job)
            deleted.append(name)
        _DEPLOYED.pop(name, None)
    return deleted


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
