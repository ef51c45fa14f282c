"""The Helm chart, rendered and checked offline: Helm 4 (helm-python-sdk) renders and lints it, core objects are
checked against the Kubernetes schemas (kubernetes-validate), the RayService against KubeRay's CRD schema,
``serveConfigV2`` with Ray Serve's own schema, and the serve config against ``serve_config()``: the one source
of truth in ``services/deployments.py``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python", reason="needs the cluster extra (helm-python-sdk)")
yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from colabel.apps import cluster  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "colabel"
#: Kubernetes version the core objects are validated against (kubernetes-validate's offline schemas).
K8S_VERSION = "1.31.0"
CRD = Path("/work/shared/schemas/kuberay/ray.io_rayservices.yaml")
VARIANTS = {"default": None, "gpu": CHART / "values-gpu.yaml"}


def pinned_ray_version() -> str:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [re.fullmatch(r"ray\[[^\]]*\]==([0-9.]+)", dep.replace(" ", ""))
            for deps in project["optional-dependencies"].values() for dep in deps]
    versions = {m.group(1) for m in pins if m}
    assert len(versions) == 1, f"ray must be pinned exactly once, found {versions}"
    return versions.pop()


def render(values: dict | None = None, *, variant: str = "default", name: str = "colabel") -> list[dict]:
    overrides = yaml.safe_load(VARIANTS[variant].read_text()) if VARIANTS[variant] else {}
    merged = _deep_merge(overrides, values or {})
    manifests = helm.Chart.load(str(CHART)).render(merged, name=name, namespace="lab", is_install=True)
    documents = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def one(documents: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in by_kind(documents, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"{len(found)} {kind} {component or ''}"
    return found[0]


def ray_pod_templates(rayservice: dict) -> dict[str, dict]:
    config = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": config["headGroupSpec"]["template"]}
    for group in config.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def all_pod_specs(documents: list[dict]) -> dict[str, dict]:
    specs = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in by_kind(documents, "Deployment")}
    for group, template in ray_pod_templates(one(documents, "RayService")).items():
        specs[f"ray-{group}"] = template["spec"]
    return specs


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def documents(variant) -> list[dict]:
    return render(variant=variant)


def test_lint_is_clean(variant):
    values = yaml.safe_load(VARIANTS[variant].read_text()) if VARIANTS[variant] else None
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_core_objects_validate_against_kubernetes_schemas(documents):
    kinds = set()
    for document in documents:
        if document["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        kinds.add(document["kind"])
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim"} <= kinds
    # the Ray pod templates are core PodSpecs too: validate each as a Pod
    for group, template in ray_pod_templates(one(documents, "RayService")).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{group}", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_rayservice_validates_against_the_kuberay_crd(documents):
    crd = yaml.safe_load(CRD.read_text()) if CRD.exists() else pytest.skip(f"{CRD} not found")
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    rayservice = one(documents, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(schema).validate(rayservice)


def test_serve_config_is_a_valid_serve_deploy_config(documents):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(one(documents, "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema(**config)
    scalings = [d["autoscaling_config"] for app in config["applications"] for d in app["deployments"]]
    assert scalings and all(AutoscalingConfig(**s).max_replicas >= 1 for s in scalings)


def test_serve_config_is_serve_config_output(documents, variant):
    from colabel.services.deployments import MODEL_DEPLOYMENTS, serve_config

    gpu = variant == "gpu"
    rendered = yaml.safe_load(one(documents, "RayService")["spec"]["serveConfigV2"])
    assert rendered == cluster.cluster_serve_config(gpu=gpu)
    # the applications are exactly serve_config()'s, with the caches on the chart's volume
    expected = serve_config(gpu=gpu, options=cluster.cache_options(cluster.CACHE_DIR))
    assert rendered["applications"] == expected["applications"]
    assert [a["name"] for a in rendered["applications"]] == list(MODEL_DEPLOYMENTS)
    gpus = {a["name"]: a["deployments"][0]["ray_actor_options"]["num_gpus"] for a in rendered["applications"]}
    assert gpus == {n: int(gpu and d.wants_gpu) for n, d in MODEL_DEPLOYMENTS.items()}


@pytest.mark.parametrize("gpu", [False, True])
def test_committed_serve_config_files_equal_a_fresh_generation(gpu):
    committed = (CHART / cluster.SERVE_CONFIG_FILES[gpu]).read_text()
    assert committed == cluster.serve_config_yaml(gpu=gpu), \
        "regenerate: colabel cluster serve-config --chart charts/colabel"


def test_ray_version_equals_the_pyproject_pin(documents):
    pin = pinned_ray_version()
    assert one(documents, "RayService")["spec"]["rayClusterConfig"]["rayVersion"] == pin
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == pin
    # the Dockerfile installs ray through the package's pin, never a version of its own
    assert not re.search(r"ray(\[[^\]]*\])?==", (ROOT / "Dockerfile").read_text())


def test_every_pod_runs_hardened_and_non_root(documents):
    for name, spec in all_pod_specs(documents).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["runAsNonRoot"] is True, name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: /tmp must be a writable emptyDir"
    rayservice = one(documents, "RayService")
    autoscaler = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["capabilities"]["drop"] == ["ALL"] and autoscaler["runAsNonRoot"] is True
    for name in ("colabel-hypha", "colabel-gateway"):  # read-only root: they write only to /tmp
        assert all_pod_specs(documents)[name]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_hypha_server_has_probes_and_its_token_from_a_secret(documents):
    deployment = one(documents, "Deployment", "hypha")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["hypha"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
    assert container["startupProbe"]["httpGet"]["path"] == "/health/readiness"
    env = {e["name"]: e for e in container["env"]}
    secret = one(documents, "Secret")
    assert env["HYPHA_ROOT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                   "key": "root-token"}
    assert "value" not in env["HYPHA_ROOT_TOKEN"]
    service = one(documents, "Service", "hypha")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 9527


def test_generated_root_token_is_acceptable_to_hypha(documents):
    import base64

    token = base64.b64decode(one(documents, "Secret")["data"]["root-token"]).decode()
    assert len(token) >= 64  # Hypha checks shorter ones for weak words, which a random one may contain


def test_a_given_root_token_of_64_characters_may_hold_weak_words():
    token = "abc123test" + "x" * 54
    documents = render({"hypha": {"rootToken": {"value": token}}})
    import base64

    assert base64.b64decode(one(documents, "Secret")["data"]["root-token"]).decode() == token


def test_no_secret_is_written_into_any_pod(documents):
    token = one(documents, "Secret")["data"]["root-token"]
    for document in documents:
        if document["kind"] != "Secret":
            assert token not in yaml.safe_dump(document)


def test_existing_secret_is_used_and_none_created():
    documents = render({"hypha": {"rootToken": {"existingSecret": "my-token", "secretKey": "token"}}})
    assert by_kind(documents, "Secret") == []
    for component in ("hypha", "gateway"):
        container = one(documents, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert refs == [{"name": "my-token", "key": "token"}]


def test_gateway_attaches_to_the_rayservice_and_registers_on_hypha(documents):
    gateway = one(documents, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    args = gateway["args"]
    assert args[0] == "gateway" and "--attach" in args
    hypha_service = one(documents, "Service", "hypha")["metadata"]["name"]
    assert args[args.index("--server-url") + 1] == f"http://{hypha_service}:9527"
    assert args[args.index("--token") + 1] == "$(ROOT_TOKEN)"
    rayservice = one(documents, "RayService")["metadata"]["name"]
    assert args[args.index("--ray-address") + 1] == f"ray://{rayservice}-head-svc:10001"
    env = {e["name"]: e for e in gateway["env"]}
    assert "secretKeyRef" in env["ROOT_TOKEN"]["valueFrom"]
    # the flags exist in `colabel models` (all but --attach, which the gateway role adds)
    from colabel.apps.cli import build_parser

    models_parser = build_parser()._subparsers._group_actions[0].choices["models"]
    known = {option for action in models_parser._actions for option in action.option_strings}
    assert {a for a in args if a.startswith("--")} - known <= {"--attach"}


def test_ray_pods_mount_the_cache_volume_where_the_serve_config_points(documents):
    claim = one(documents, "PersistentVolumeClaim")["metadata"]["name"]
    for group, template in ray_pod_templates(one(documents, "RayService")).items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == cluster.CACHE_DIR)
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim, group
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    config = yaml.safe_load(one(documents, "RayService")["spec"]["serveConfigV2"])
    paths = [v for app in config["applications"] for k, v in app["args"]["options"].items() if k.endswith("_dir")]
    assert len(paths) == 4 and all(p.startswith(cluster.CACHE_DIR + "/") for p in paths)


def test_autoscaling_and_worker_groups(documents, variant):
    config = one(documents, "RayService")["spec"]["rayClusterConfig"]
    assert config["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in config["workerGroupSpecs"]}
    assert "cpu" in groups
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head = config["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas stay off the head
    if variant == "gpu":
        gpu = groups["gpu"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
        # enough GPU pods for one replica of every GPU service
        from colabel.services.deployments import MODEL_DEPLOYMENTS

        wanting = [d for d in MODEL_DEPLOYMENTS.values() if d.wants_gpu]
        assert groups["gpu"]["minReplicas"] >= len(wanting)
    else:
        assert "gpu" not in groups


def test_ingress_is_optional_and_points_at_the_hypha_service():
    assert by_kind(render(), "Ingress") == []
    documents = render({"hypha": {"ingress": {"enabled": True, "host": "colabel.example.org",
                                              "tlsSecretName": "colabel-tls", "className": "nginx"}}})
    ingress = one(documents, "Ingress")
    kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == one(documents, "Service", "hypha")["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in
           one(documents, "Deployment", "hypha")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HYPHA_PUBLIC_BASE_URL"] == "https://colabel.example.org"


@pytest.mark.parametrize("values, where", [
    ({"hypha": {"rootToken": {"value": "too-short"}}}, "rootToken"),
    ({"hypha": {"rootToken": {"value": "x" * 32 + "test"}}}, "rootToken"),
    ({"hypha": {"rootToken": {"value": "x" * 40 + "AbC"}}}, "rootToken"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ({"ray": {"verison": "2.55.1"}}, "verison"),
    ({"cache": {"accessModes": ["ReadWriteSometimes"]}}, "accessModes"),
])
def test_schema_refuses_bad_values(values, where):
    with pytest.raises(helm.HelmError, match=where):
        render(values)


def test_notes_render():
    notes = helm.Chart.load(str(CHART)).render(None, name="colabel", namespace="lab")["colabel/templates/NOTES.txt"]
    assert "colabel cluster status -n lab --release colabel" in notes and "colabel-hypha" in notes


def test_dockerfile_runs_every_role_as_non_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM node:\S+ AS web$", dockerfile, re.M)
    assert re.search(r"^USER 1000(:1000)?$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "ENTRYPOINT" in dockerfile
    assert "torch==${TORCH_VERSION}" in dockerfile and "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert ".[server,models,hals]" in dockerfile
    for role in ("hypha)", "gateway)", "provider)"):
        assert role in dockerfile
    assert "uvicorn hypha.server:app" in dockerfile and "--ws-per-message-deflate false" in dockerfile
    assert "--mount=type=cache" in dockerfile
