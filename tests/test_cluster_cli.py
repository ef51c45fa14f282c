"""``colabel cluster`` against an emulated Kubernetes API server (kmock on loopback): install, status, scale,
with the real kubernetes client configured to the emulator's URL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

kmock = pytest.importorskip("kmock", reason="needs the cluster extra (kmock)")
helm = pytest.importorskip("helm_python", reason="needs the cluster extra (helm-python-sdk)")
yaml = pytest.importorskip("yaml")
pytest.importorskip("kubernetes")

from colabel.apps import cluster  # noqa: E402
from colabel.apps.cli import main  # noqa: E402

pytestmark = pytest.mark.unit

NS = "lab"


class EmulatedApiServer:
    """kmock's Kubernetes emulator (an in-memory object store over HTTP) in a thread with its own event loop,
    so the synchronous kubernetes client can talk to it."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.emulator = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "EmulatedApiServer":
        self._thread.start()
        assert self._ready.wait(20), "kmock did not start"
        return self

    def requests(self, method: str | None = None) -> list:
        """The requests the emulator received (kmock records every one), optionally of one HTTP method."""
        return [r for r in list(self.emulator) if method is None or r.method.value == method]

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def api_server():
    with EmulatedApiServer() as server:
        yield server


@pytest.fixture
def api(api_server):
    client = cluster.api_client(server=api_server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """``helm template colabel charts/colabel`` written to a file, as a user would."""
    rendered = helm.Chart.load(str(cluster.CHART_DIR)).render(None, name="colabel", namespace=NS)
    path = tmp_path_factory.mktemp("manifest") / "all.yaml"
    path.write_text("\n---\n".join(text for name, text in sorted(rendered.items()) if name.endswith(".yaml")))
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["cluster", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rayservice(api, name="colabel-ray") -> dict:
    from kubernetes import client

    return client.CustomObjectsApi(api).get_namespaced_custom_object("ray.io", "v1", NS, "rayservices", name)


def serve_config_of(api) -> dict:
    return yaml.safe_load(rayservice(api)["spec"]["serveConfigV2"])


def test_install_creates_then_patches_the_rayservice(api_server, api, manifest, capsys):
    code, out, _ = cli(capsys, "install", "--manifest", str(manifest), "-n", NS, "--server", api_server.url)
    assert code == 0 and out.strip() == f"RayService colabel-ray created in namespace {NS}"
    stored = rayservice(api)
    assert stored["spec"]["rayClusterConfig"]["rayVersion"] == "2.55.1"
    assert yaml.safe_load(stored["spec"]["serveConfigV2"]) == cluster.cluster_serve_config(gpu=False)
    assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == "colabel"

    code, out, _ = cli(capsys, "install", "--manifest", str(manifest), "-n", NS, "--server", api_server.url)
    assert code == 0 and out.strip() == f"RayService colabel-ray patched in namespace {NS}"
    methods = [r.method.value for r in api_server.requests() if "rayservices" in str(r.url)]
    assert methods.count("POST") == 1 and methods.count("PATCH") == 1
    [patch] = api_server.requests("PATCH")
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert patch.data == {"metadata": {}, "spec": {}}  # nothing changed, nothing sent


def test_merge_patch_turns_current_into_desired():
    current = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": {"x": 1}}
    desired = {"a": 1, "b": {"c": 5}, "e": [3], "new": None}
    assert cluster.merge_patch(current, desired) == {"b": {"c": 5, "d": None}, "e": [3], "gone": None,
                                                     "new": None}


def test_install_without_manifest_rewrites_serve_config_from_serve_config(api_server, api, manifest, capsys):
    cli(capsys, "install", "--manifest", str(manifest), "-n", NS, "--server", api_server.url)
    stale = cluster.cluster_serve_config()
    stale["applications"] = stale["applications"][:1]
    from kubernetes import client

    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "ray.io", "v1", NS, "rayservices", "colabel-ray", {"spec": {"serveConfigV2": yaml.safe_dump(stale)}})
    assert len(serve_config_of(api)["applications"]) == 1

    code, out, _ = cli(capsys, "install", "-n", NS, "--release", "colabel", "--server", api_server.url)
    assert code == 0 and "patched" in out
    assert serve_config_of(api) == cluster.cluster_serve_config(gpu=False)
    code, out, _ = cli(capsys, "install", "--gpu", "-n", NS, "--rayservice", "colabel-ray", "--server", api_server.url)
    assert code == 0
    assert serve_config_of(api) == cluster.cluster_serve_config(gpu=True)


def test_install_refuses_a_manifest_without_rayservice(api_server, tmp_path, capsys):
    path = tmp_path / "other.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    code, _, err = cli(capsys, "install", "--manifest", str(path), "-n", NS, "--server", api_server.url)
    assert code == 2 and "holds no RayService" in err and err.count("\n") == 1


def test_scale_patches_one_deployments_autoscaling_config(api_server, api, manifest, capsys):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    cli(capsys, "install", "--manifest", str(manifest), "-n", NS, "--server", api_server.url)
    before = serve_config_of(api)
    code, out, _ = cli(capsys, "scale", "sam", "--min", "2", "--max", "6", "--target-ongoing-requests", "3",
                       "-n", NS, "--server", api_server.url)
    assert code == 0 and out.startswith("sam: autoscaling_config")
    after = serve_config_of(api)
    ServeDeploySchema(**after)
    scaling = {a["name"]: a["deployments"][0]["autoscaling_config"] for a in after["applications"]}
    assert AutoscalingConfig(**scaling["sam"]).min_replicas == 2
    assert scaling["sam"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 3.0}
    # everything else is untouched
    for app_before, app_after in zip(before["applications"], after["applications"], strict=True):
        if app_before["name"] != "sam":
            assert app_before == app_after
    [patch] = api_server.requests("PATCH")
    assert patch.data == {"spec": {"serveConfigV2": patch.data["spec"]["serveConfigV2"]}}
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


@pytest.mark.parametrize("args, message", [
    (["sam", "--min", "5", "--max", "2"], "--min <= --max"),
    (["sam", "--min", "0", "--max", "0"], "--max >= 1"),
    (["segformer", "--min", "1", "--max", "2"], "no deployment 'segformer'"),
])
def test_scale_refuses_with_one_sentence(api_server, manifest, capsys, args, message):
    cli(capsys, "install", "--manifest", str(manifest), "-n", NS, "--server", api_server.url)
    code, _, err = cli(capsys, "scale", *args, "-n", NS, "--server", api_server.url)
    assert code == 2 and message in err and err.count("\n") == 1


def test_scale_without_rayservice_says_how_to_install(api_server, capsys):
    code, _, err = cli(capsys, "scale", "sam", "--min", "1", "--max", "2", "-n", NS, "--rayservice", "nope",
                       "--server", api_server.url)
    assert code == 2 and "not found" in err and "install" in err


def test_status_lists_applications_replicas_and_deployments(api_server, api, manifest, capsys):
    from kubernetes import client

    documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    service = next(d for d in documents if d["kind"] == "RayService")
    # what the KubeRay operator would report (kmock stores objects, it runs no controllers)
    service["status"] = {
        "serviceStatus": "Running",
        "activeServiceStatus": {
            "rayClusterName": "colabel-ray-abcde",
            "rayClusterStatus": {"state": "ready", "readyWorkerReplicas": 2, "desiredWorkerReplicas": 2,
                                 "maxWorkerReplicas": 4},
            "applicationStatuses": {
                "sam": {"status": "RUNNING", "serveDeploymentStatuses": {"sam": {"status": "HEALTHY"}}},
                "nuclei": {"status": "DEPLOYING", "serveDeploymentStatuses": {"nuclei": {"status": "UPDATING"}}},
            },
        },
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object("ray.io", "v1", NS, "rayservices", service)
    apps = client.AppsV1Api(api)
    for document in documents:
        if document["kind"] == "Deployment":
            document["status"] = {"replicas": 1, "readyReplicas": 1}
            apps.create_namespaced_deployment(NS, document)

    code, out, _ = cli(capsys, "status", "--json", "-n", NS, "--release", "colabel", "--server", api_server.url)
    assert code == 0
    report = json.loads(out)
    assert report["rayservice"] == "colabel-ray" and report["service_status"] == "Running"
    assert report["ray_cluster"] == {"name": "colabel-ray-abcde", "state": "ready", "ready_workers": 2,
                                     "desired_workers": 2, "max_workers": 4}
    apps_by_name = {a["name"]: a for a in report["applications"]}
    assert list(apps_by_name) == ["sam", "nuclei", "classifier", "coreset"]
    assert apps_by_name["sam"]["status"] == "RUNNING"
    assert apps_by_name["sam"]["deployments"] == [{"name": "sam", "status": "HEALTHY", "min_replicas": 1,
                                                   "max_replicas": 4, "num_gpus": 0}]
    assert apps_by_name["classifier"]["status"] == "UNKNOWN"
    assert sorted(d["name"] for d in report["deployments"]) == ["colabel-gateway", "colabel-hypha"]
    assert all(d["ready"] == 1 and d["replicas"] == 1 for d in report["deployments"])

    code, out, _ = cli(capsys, "status", "-n", NS, "--server", api_server.url)
    assert code == 0 and "RayService colabel-ray: Running" in out
    assert any(line.split()[:3] == ["nuclei", "nuclei", "UPDATING"] for line in out.splitlines())


def test_serve_config_command_prints_and_writes(tmp_path, capsys):
    code, out, _ = cli(capsys, "serve-config", "--gpu")
    assert code == 0 and yaml.safe_load(out) == cluster.cluster_serve_config(gpu=True)
    code, _, err = cli(capsys, "serve-config", "--chart", str(tmp_path / "nope"))
    assert code == 2 and "is not a Helm chart (it has no Chart.yaml)" in err and err.count("\n") == 1
    assert not (tmp_path / "nope").exists()  # nothing created where no chart is
    (tmp_path / "Chart.yaml").write_text((cluster.CHART_DIR / "Chart.yaml").read_text())
    code, out, _ = cli(capsys, "serve-config", "--chart", str(tmp_path))
    assert code == 0
    for relative in cluster.SERVE_CONFIG_FILES.values():
        assert (tmp_path / relative).read_text() == (cluster.CHART_DIR / relative).read_text()


def test_cluster_help_is_fast_and_needs_no_cluster():
    result = subprocess.run([sys.executable, "-m", "colabel.apps.cli", "cluster", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve-config", "install", "status", "scale"):
        assert command in result.stdout


def test_unreachable_servers_and_unreadable_files_are_refused_in_one_sentence(tmp_path):
    """Run as a user would (a subprocess): exit code 2, one line on stderr, no traceback, no retry warnings."""
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "text.yaml").write_text("hello\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    unreachable = ["--server", "http://127.0.0.1:1"]
    cases = [
        (["status", *unreachable], "cannot reach the Kubernetes API server http://127.0.0.1:1: "),
        (["scale", "sam", "--min", "1", "--max", "2", *unreachable], "cannot reach the Kubernetes API server"),
        (["install", *unreachable], "cannot reach the Kubernetes API server"),
        (["status", "--kubeconfig", tmp_path / "bad.yaml"], "cannot read the kubeconfig"),
        (["status", "--kubeconfig", tmp_path / "text.yaml"], "is not a kubeconfig"),
        (["install", "--manifest", tmp_path / "binary.yaml", *unreachable], "binary.yaml: not a text file"),
        (["install", "--manifest", tmp_path / "bad.yaml", *unreachable], "at line 2, column 1"),
        (["install", "--manifest", tmp_path / "text.yaml", *unreachable], "holds no RayService"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "colabel.apps.cli", "cluster", *map(str, args)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("colabel: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
