"""The gateway (`colabel models`) against real Ray clusters and a real Hypha server.

A Ray cluster here is what KubeRay runs: `ray start --head --block` with a Ray Client server, in a session of its
own on loopback with a private temp folder, and the model services deployed into it as Serve applications. The
gateway attaches to it over `ray://` as the Helm chart's does. Clusters are stopped by their process group
(never `ray stop`, which would end every Ray of the machine). The health monitor's rules are also checked with
stand-in checks, without Ray.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from colabel.apps.hypha_server import free_port

pytestmark = pytest.mark.integration

COLABEL = [sys.executable, "-m", "colabel.apps.cli"]

DEPLOY = """
import sys
from colabel.services import ray_runtime
ray_runtime.start_local_ray(address=sys.argv[1], quiet=True)
ray_runtime.deploy(sys.argv[2].split(","), gpu=False)
"""


class RayHead:
    """A one-node Ray cluster as KubeRay runs its head: GCS on ``gcs_port``, Ray Client server on
    ``client_port`` (``client_address`` is what the gateway attaches to), 2 CPUs, no dashboard."""

    def __init__(self, gcs_port: int | None = None, client_port: int | None = None) -> None:
        self.gcs_port = gcs_port or free_port()
        self.client_port = client_port or free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's socket paths live under it
        self.process: subprocess.Popen | None = None
        self.log = Path(self.temp_dir) / "head.log"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 120) -> "RayHead":
        cmd = [shutil.which("ray") or "ray", "start", "--head", "--block", "--port", str(self.gcs_port),
               "--ray-client-server-port", str(self.client_port), "--node-ip-address", "127.0.0.1",
               "--num-cpus", "2", "--include-dashboard", "false", "--dashboard-agent-listen-port",
               str(free_port()), "--temp-dir", self.temp_dir, "--disable-usage-stats",
               "--object-store-memory", str(200 * 2**20)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"ray start exited: {self.log.read_text()[-2000:]}"
            if "Ray runtime started" in self.log.read_text():
                try:
                    socket.create_connection(("127.0.0.1", self.client_port), timeout=1).close()
                    return self
                except OSError:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"the Ray head did not start within {timeout} s: {self.log.read_text()[-2000:]}")

    def deploy(self, names: list[str]) -> None:
        """Deploy the model services as detached Serve applications (what the RayService's serveConfigV2 does)."""
        result = subprocess.run([sys.executable, "-c", DEPLOY, f"127.0.0.1:{self.gcs_port}", ",".join(names)],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]

    def kill(self) -> None:
        """Every process of the cluster at once: a head pod that is deleted or replaced."""
        if self.process is not None and self.process.poll() is None:
            with contextlib_suppress():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib_suppress():
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:  # the workers of its process group that outlived `ray start`
            with contextlib_suppress():
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


class Gateway:
    """``colabel models ARGS`` as a subprocess in a session of its own; its output is collected by a thread."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.process = subprocess.Popen([*COLABEL, "models", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.printed: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if m := re.match(r"^(\w+): (\S+)$", line.strip()):
                self.printed[m.group(1)] = m.group(2)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def until(self, pattern: str, timeout: float) -> str:
        """The first output line matching ``pattern`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            await asyncio.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.output[-4000:]}")

    async def wait(self, timeout: float) -> int:
        code = await asyncio.to_thread(self.process.wait, timeout)
        await asyncio.to_thread(self._reader.join, 10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib_suppress():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


async def hypha_client(hypha_server, **config):
    from hypha_rpc import connect_to_server

    return await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token, **config})


@pytest.fixture(scope="module")
def cluster():
    """A healthy cluster running the coreset service, shared by the tests that do not break it."""
    head = RayHead().start()
    try:
        head.deploy(["coreset"])
        yield head
    finally:
        head.stop()


# -- losing the cluster -------------------------------------------------------------------------------------

async def test_an_attached_gateway_exits_with_status_1_when_its_ray_cluster_is_replaced(hypha_server, tmp_path):
    """H2: the head behind the gateway's address is replaced (a head pod restart, `helm upgrade`). The gateway
    fails the call waiting on the old cluster with a clear error, stops its heartbeat, starts no local Ray, and
    exits with status 1 and one line naming the address, so that Kubernetes restarts it."""
    import psutil

    head = await asyncio.to_thread(RayHead().start)
    replacement = None
    gateway = None
    client = None
    try:
        await asyncio.to_thread(head.deploy, ["coreset"])
        heartbeat = tmp_path / "run" / "alive"
        heartbeat.parent.mkdir()
        prefix = f"lost{os.getpid()}"
        # the token from the environment, as the chart passes it: not on the command line, where ps shows it
        gateway = Gateway(["--server-url", hypha_server.url, "--attach", "--ray-address", head.client_address,
                           "--models", "coreset", "--models-prefix", prefix, "--heartbeat", str(heartbeat),
                           "--health-interval", "2"],
                          env={"COLABEL_TOKEN": hypha_server.root_token})
        await gateway.until(r"^Press Ctrl-C", 120)
        assert hypha_server.root_token not in " ".join(psutil.Process(gateway.process.pid).cmdline())
        assert heartbeat.is_file()  # registered on Hypha: ready

        client = await hypha_client(hypha_server, method_timeout=180)
        coreset = await client.get_service(gateway.printed["model_service_coreset"])
        assert "method" in await coreset.info()
        first = heartbeat.stat().st_mtime
        deadline = time.monotonic() + 25
        while heartbeat.stat().st_mtime == first:  # rewritten after a passing health check, every 2 s here
            assert time.monotonic() < deadline, "the heartbeat file was not refreshed within 25 s"
            await asyncio.sleep(0.5)

        await asyncio.to_thread(head.kill)
        # KubeRay's new head takes the same Service address; the old Serve applications are gone with the old one
        replacement = RayHead(gcs_port=head.gcs_port, client_port=head.client_port)
        restarting = asyncio.ensure_future(asyncio.to_thread(replacement.start))
        started = time.monotonic()
        with pytest.raises(Exception, match=re.escape(f"the Ray cluster at {head.client_address} does not answer")):
            await coreset.info()  # waiting on the lost cluster: a clear error long before the caller's timeout
        assert time.monotonic() - started < 90

        started = time.monotonic()
        while gateway.process.poll() is None:  # never a local Ray inside the gateway
            with contextlib_suppress():
                names = {p.name() for p in psutil.Process(gateway.process.pid).children(recursive=True)}
                assert not names & {"raylet", "gcs_server", "plasma_store"}, names
            assert time.monotonic() - started < 60, "the gateway did not exit"
            await asyncio.sleep(0.5)
        assert await gateway.wait(10) == 1
        last = gateway.lines[-1]
        assert last.startswith(f"colabel: the Ray cluster at {head.client_address} does not answer: "), last
        assert last.endswith("; exiting")
        assert "Started a local Ray instance" not in gateway.output
        assert not heartbeat.exists()  # neither ready nor alive
        await restarting
    finally:
        if client is not None:
            with contextlib_suppress():
                await client.disconnect()
        if gateway is not None:
            gateway.stop()
        head.stop()
        if replacement is not None:
            replacement.stop()


def test_no_ray_call_of_an_attached_gateway_can_start_a_local_ray():
    """After `never_start_local_ray`, Ray's auto-init (what a Ray Client without its cluster falls back to)
    refuses instead of starting a local instance."""
    script = (
        "from colabel.services import ray_runtime\n"
        "ray_runtime.never_start_local_ray('ray://127.0.0.1:1')\n"
        "import ray, psutil\n"
        "for name, call in [('put', lambda: ray.put(1)), ('get', lambda: ray.get([])),\n"
        "                   ('resources', lambda: ray.available_resources())]:\n"
        "    try:\n"
        "        call()\n"
        "        print(name, 'ran')\n"
        "    except Exception as exc:\n"
        "        print(name, 'refused')\n"
        "print('initialized', ray.is_initialized())\n"
        "print('children', sorted(p.name() for p in psutil.Process().children(recursive=True)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                                                    "RAY_ENABLE_AUTO_CONNECT")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:5] == ["put refused", "get refused", "resources refused", "initialized False",
                                              "children []"], result.stdout + result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr


# -- waiting for the cluster at start (M5) ------------------------------------------------------------------

async def test_attach_says_which_applications_are_missing_and_gives_up_after_attach_timeout(
        cluster, hypha_server, tmp_path):
    heartbeat = tmp_path / "alive"
    gateway = Gateway(["--server-url", hypha_server.url, "--attach", "--ray-address", cluster.client_address,
                       "--models", "coreset,sam", "--attach-timeout", "5", "--heartbeat", str(heartbeat)],
                      env={"COLABEL_TOKEN": hypha_server.root_token})
    try:
        code = await gateway.wait(120)
    finally:
        gateway.stop()
    waiting = [line for line in gateway.lines if line.startswith("waiting for the Ray cluster")]
    assert len(waiting) == 1, gateway.output  # at once (then every 30 s: this one gives up first)
    assert re.fullmatch(re.escape(f"waiting for the Ray cluster at {cluster.client_address}: Serve application(s) not "
                                  "running yet: sam not deployed (the cluster runs: coreset) (") + r"\d s so far\)",
                        waiting[0]), waiting
    assert code == 2
    assert re.fullmatch(r"colabel: gave up after \d+ s \(--attach-timeout 5\): Serve application\(s\) not running "
                        r"yet: sam not deployed \(the cluster runs: coreset\)", gateway.lines[-1]), gateway.lines[-1]
    assert not heartbeat.exists()  # never registered: never ready


async def test_attach_waits_as_long_as_it_takes_by_default_then_registers(cluster, hypha_server, tmp_path):
    heartbeat = tmp_path / "alive"
    gateway = Gateway(["--server-url", hypha_server.url, "--attach", "--ray-address", cluster.client_address,
                       "--models", "coreset,nuclei", "--models-prefix", f"wait{os.getpid()}",
                       "--heartbeat", str(heartbeat)], env={"COLABEL_TOKEN": hypha_server.root_token})
    try:
        line = await gateway.until(r"^waiting for the Ray cluster", 90)
        assert "nuclei not deployed (the cluster runs: coreset)" in line
        assert not heartbeat.exists()
        await asyncio.to_thread(cluster.deploy, ["nuclei"])  # the RayService finishes deploying
        await gateway.until(r"^Press Ctrl-C", 120)
        assert {"model_service_coreset", "model_service_nuclei"} <= set(gateway.printed), gateway.output
        assert heartbeat.is_file()
        os.killpg(gateway.process.pid, signal.SIGTERM)
        assert await gateway.wait(60) == 0
        assert not heartbeat.exists()  # removed at exit
    finally:
        gateway.stop()


# -- the heartbeat without --attach --------------------------------------------------------------------------

async def test_the_heartbeat_follows_the_serve_applications_it_deployed_without_attach(cluster, hypha_server, tmp_path):
    """`colabel models` that deploys its own Serve applications (here on a running cluster, --ray-address without
    --attach; a Ray it starts itself is checked the same way): the heartbeat file appears once the services are
    registered and is rewritten every --health-interval seconds while its Serve applications answer; a folder that
    does not exist, or an interval out of range, is refused before anything starts."""
    refused = subprocess.run([*COLABEL, "models", "--server-url", hypha_server.url, "--models", "coreset",
                              "--heartbeat", str(tmp_path / "nope" / "alive")], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "COLABEL_TOKEN": hypha_server.root_token})
    assert refused.returncode == 2
    assert refused.stderr == f"colabel: --heartbeat {tmp_path / 'nope' / 'alive'}: folder {tmp_path / 'nope'} does " \
                             "not exist\n", refused.stderr
    assert "starting Ray" not in refused.stdout
    refused = subprocess.run([*COLABEL, "models", "--server-url", hypha_server.url, "--models", "coreset",
                              "--health-interval", "0"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLABEL_TOKEN": hypha_server.root_token})
    assert refused.returncode == 2 and "--health-interval 0: give seconds from 0.5 to 300" in refused.stderr

    heartbeat = tmp_path / "alive"
    heartbeat.write_text("left by an earlier run\n")
    gateway = Gateway(["--server-url", hypha_server.url, "--ray-address", f"127.0.0.1:{cluster.gcs_port}",
                       "--models", "coreset", "--models-prefix", f"hb{os.getpid()}", "--heartbeat", str(heartbeat),
                       "--health-interval", "2"],
                      env={"COLABEL_TOKEN": hypha_server.root_token})
    try:
        await gateway.until(r"^starting Ray Serve", 60)
        assert not heartbeat.exists()  # a stale file never says "ready" for this run
        await gateway.until(r"^Press Ctrl-C", 180)
        assert heartbeat.is_file() and heartbeat.read_text().endswith(f"pid {gateway.process.pid}\n")
        first = heartbeat.stat().st_mtime
        deadline = time.monotonic() + 8
        while heartbeat.stat().st_mtime == first:  # every --health-interval (2 s)
            assert time.monotonic() < deadline, "the heartbeat file was not refreshed within 8 s"
            await asyncio.sleep(0.5)
        assert not [p for p in heartbeat.parent.iterdir() if p.name.startswith(".alive.")]  # atomic: no leftovers
        os.killpg(gateway.process.pid, signal.SIGTERM)
        assert await gateway.wait(90) == 0
        assert not heartbeat.exists()
    finally:
        gateway.stop()


# -- losing the Hypha server ---------------------------------------------------------------------------------

async def test_the_gateway_exits_with_status_1_when_its_hypha_server_stays_gone(tmp_path):
    """The Hypha server the gateway registered on goes away for good (its own server here, killed). While it
    answers, the gateway checks every grace/4 that its services are still registered there and rewrites its
    heartbeat; once it is gone the heartbeat stops, and after --hypha-grace the gateway exits with status 1 and
    one line naming the server, so that Kubernetes restarts it."""
    from colabel.apps.hypha_server import EmbeddedHypha

    hypha = await asyncio.to_thread(EmbeddedHypha("127.0.0.1", free_port(), ready_timeout=90).start)
    heartbeat = tmp_path / "alive"
    gateway = None
    try:
        gateway = Gateway(["--server-url", hypha.url, "--no-ray", "--models", "coreset", "--hypha-grace", "2",
                           "--heartbeat", str(heartbeat)], env={"COLABEL_TOKEN": hypha.root_token})
        await gateway.until(r"^Press Ctrl-C", 60)
        first = heartbeat.stat().st_mtime_ns
        await asyncio.sleep(3)  # longer than the grace period: the checks pass
        assert gateway.process.poll() is None, gateway.output
        assert heartbeat.stat().st_mtime_ns > first  # rewritten after the passing checks (every 0.5 s here)

        os.killpg(hypha.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.sleep(0.3)  # a beat after a check that passed just before the kill
        beaten = heartbeat.stat().st_mtime_ns
        while gateway.process.poll() is None:
            assert time.monotonic() - killed < 20, f"the gateway did not exit:\n{gateway.output[-3000:]}"
            try:
                assert heartbeat.stat().st_mtime_ns == beaten, "the heartbeat went on without the Hypha server"
            except FileNotFoundError:  # removed on the way out
                pass
            await asyncio.sleep(0.1)
        assert await gateway.wait(10) == 1
        assert time.monotonic() - killed > 1.5  # not before the grace period (from the first check that failed)
        last = gateway.lines[-1]
        assert last.startswith(f"colabel: the Hypha server at {hypha.url} does not answer: its health checks "
                               "failed for "), last
        assert "in a row (grace period 2 s; the last: " in last and last.endswith("; exiting"), last
        assert not heartbeat.exists()  # neither ready nor alive
    finally:
        if gateway is not None:
            gateway.stop()
        hypha.stop()
        if hypha.log_path is not None:  # kept by stop() for a server that did not end by it
            hypha.log_path.unlink(missing_ok=True)


async def test_the_heartbeat_stops_and_the_hypha_server_is_lost_when_the_services_are_no_longer_registered(
        hypha_server, tmp_path):
    """The other way Hypha can fail the gateway: the connection works but its services are gone from the server
    (not registered again after a reconnection). The heartbeat follows both monitors: it stops although the
    model services still answer, and the Hypha monitor declares the server lost after its grace period."""
    from hypha_rpc import connect_to_server

    from colabel.services.deployments import get_deployment
    from colabel.services.gateway import (
        HealthMonitor,
        Heartbeat,
        LocalBackend,
        hypha_health_monitor,
        register_model_services,
    )

    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    try:
        ids = await register_model_services(server, {"coreset": LocalBackend(
            "coreset", get_deployment("coreset").load_class()())}, prefix=f"hg{os.getpid()}")
        models = HealthMonitor(lambda: None, target="the model services", interval=0.1)
        hypha = hypha_health_monitor(server, hypha_server.url, ids.values(), grace=1)
        assert (hypha.interval, hypha.timeout, hypha.grace) == (0.25, 0.5, 1)
        heartbeat = Heartbeat(tmp_path / "alive")
        heartbeat.follow(models, hypha)
        tasks = [asyncio.ensure_future(m.run()) for m in (models, hypha)]
        deadline = time.monotonic() + 10
        while not heartbeat.path.exists():
            assert time.monotonic() < deadline and not hypha.lost.is_set(), hypha.reason
            await asyncio.sleep(0.05)

        await server.unregister_service(ids["coreset"])
        gone = time.monotonic()
        await asyncio.sleep(0.6)  # the Hypha check that follows fails (every 0.25 s)
        assert not hypha.passing and not hypha.lost.is_set()
        beaten = heartbeat.path.stat().st_mtime_ns
        await asyncio.wait_for(tasks[1], 10)
        assert 0.9 < time.monotonic() - gone < 5
        assert heartbeat.path.stat().st_mtime_ns == beaten  # the model services kept passing: no beat
        assert models.passing and not models.lost.is_set()
        assert hypha.reason.startswith(f"the Hypha server at {hypha_server.url} does not answer: its health checks "
                                       "failed for "), hypha.reason
        assert f"get_service_info({ids['coreset']}): KeyError: 'Service not found" in hypha.reason, hypha.reason
        tasks[0].cancel()
    finally:
        await server.disconnect()


# -- the monitor's rules, with stand-in checks ----------------------------------------------------------------

@pytest.mark.unit
async def test_the_health_monitor_declares_loss_after_3_failures_in_a_row_only():
    from colabel.services.gateway import HealthMonitor

    outcomes = iter([False, False, True, False, False, True, False, False, False])
    passes = []

    def check():
        if not next(outcomes):
            raise RuntimeError("Serve did not answer")

    monitor = HealthMonitor(check, target="the Ray cluster at ray://h:1", interval=0.05, timeout=1,
                            on_pass=lambda: passes.append(1))
    await asyncio.wait_for(monitor.run(), 10)
    assert len(passes) == 2  # two failures in a row, twice, were forgiven
    assert monitor.lost.is_set()
    assert monitor.reason == ("the Ray cluster at ray://h:1 does not answer: 3 health checks failed in a row, "
                              "0.05 s apart (the last: Serve did not answer)")


@pytest.mark.unit
async def test_a_check_without_answer_fails_and_a_lost_connection_ends_at_once():
    from colabel.services.gateway import HealthMonitor, Unrecoverable

    hung = threading.Event()
    monitor = HealthMonitor(lambda: hung.wait(30), target="X", interval=0.05, timeout=0.1)
    await asyncio.wait_for(monitor.run(), 10)
    hung.set()
    assert monitor.reason == "X does not answer: 3 health checks failed in a row, 0.05 s apart (the last: no answer " \
                             "within 0.1 s)"

    def gone():
        raise Unrecoverable("the Ray client has lost its connection")

    monitor = HealthMonitor(gone, target="X", interval=0.05, timeout=1)
    await asyncio.wait_for(monitor.run(), 10)
    assert monitor.reason == "X does not answer: the Ray client has lost its connection"

    state = {"lost": False}
    monitor = HealthMonitor(lambda: None, target="X", interval=60, gone_every_s=0.05,
                            gone=lambda: "gone for good" if state["lost"] else None)
    task = asyncio.ensure_future(monitor.run())
    await asyncio.sleep(0.2)
    assert not monitor.lost.is_set()
    state["lost"] = True
    await asyncio.wait_for(task, 5)  # no 60 s wait for the next check
    assert monitor.reason == "X does not answer: gone for good"


@pytest.mark.unit
async def test_with_a_grace_period_failures_shorter_than_it_are_forgiven_and_longer_ones_lose_the_target():
    """A coroutine check (a call through the Hypha connection) that fails for less than ``grace`` (a reconnection)
    is forgiven; failing for ``grace`` in a row loses the target, however many checks that was."""
    from colabel.services.gateway import HealthMonitor

    state = {"down_until": 0.0, "hang": False}
    passes = []

    async def check():
        if state["hang"]:
            await asyncio.sleep(30)
        if time.monotonic() < state["down_until"]:
            raise ConnectionError("Connection is closed")

    monitor = HealthMonitor(check, target="the Hypha server at http://h:1", interval=0.05, timeout=0.1, grace=0.5,
                            on_pass=lambda: passes.append(time.monotonic()))
    task = asyncio.ensure_future(monitor.run())
    state["down_until"] = time.monotonic() + 0.3  # a short reconnection
    await asyncio.sleep(0.6)
    assert not monitor.lost.is_set() and monitor.passing
    assert passes and passes[-1] > state["down_until"]
    state["hang"] = True  # no answer any more: each check times out
    lost_from = time.monotonic()
    await asyncio.wait_for(task, 5)
    assert 0.4 < time.monotonic() - lost_from < 1.5
    assert not monitor.passing
    assert re.fullmatch(r"the Hypha server at http://h:1 does not answer: its health checks failed for 0\.\d s in a "
                        r"row \(grace period 0\.5 s; the last: no answer within 0\.1 s\)", monitor.reason), \
        monitor.reason


@pytest.mark.unit
async def test_a_call_waiting_on_a_lost_cluster_fails_with_the_reason_and_later_calls_fail_at_once():
    from colabel.services.gateway import HealthMonitor, ModelServiceError, RayBackend

    never = asyncio.Event()

    class Response:
        cancelled = False

        def __await__(self):
            return never.wait().__await__()

        def cancel(self):
            Response.cancelled = True

    class Method:
        def remote(self, *args):
            return Response()

    class Handle:
        info = Method()

    monitor = HealthMonitor(lambda: None, target="the Ray cluster at ray://h:1", interval=60)
    backend = RayBackend("coreset", Handle(), monitor)
    waiting = asyncio.ensure_future(backend.call("info"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    monitor.declare_lost("the Ray client has lost its connection")
    with pytest.raises(ModelServiceError, match=r"^coreset.info cannot run: the Ray cluster at ray://h:1 does not "
                                                r"answer: the Ray client has lost its connection; the gateway is "
                                                r"restarting"):
        await asyncio.wait_for(waiting, 2)
    assert Response.cancelled
    started = time.monotonic()
    with pytest.raises(ModelServiceError, match="does not answer"):
        await backend.call("info")
    assert time.monotonic() - started < 0.5
