"""The Helm chart, rendered and checked offline: Helm 4 (helm-python-sdk) renders and lints it, core objects are
checked against the Kubernetes schemas (kubernetes-validate), the RayService against KubeRay's CRD schema,
``serveConfigV2`` with Ray Serve's own schema, and the serve config against ``serve_config()``: the one source
of truth in ``services/deployments.py``."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
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


def render(values: dict | None = None, *, variant: str = "default", name: str = "colabel",
           chart: Path = CHART) -> list[dict]:
    overrides = yaml.safe_load(VARIANTS[variant].read_text()) if VARIANTS[variant] else {}
    merged = _deep_merge(overrides, values or {})
    manifests = helm.Chart.load(str(chart)).render(merged, name=name, namespace="lab", is_install=True)
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


def all_pod_labels(documents: list[dict]) -> dict[str, dict]:
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
              for d in by_kind(documents, "Deployment")}
    for group, template in ray_pod_templates(one(documents, "RayService")).items():
        labels[f"ray-{group}"] = template["metadata"]["labels"]
    return labels


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes LabelSelector (matchLabels, matchExpressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        holds = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not holds:
            return False
    return True


def container_env(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


#: The one `lookup` of the chart (in _helpers.tpl): tests replace it to play an installed release's Secret.
SECRET_LOOKUP = '{{- $found := lookup "v1" "Secret" $root.Release.Namespace (index . 1) | default dict -}}'


def chart_with_cluster_secret(tmp_path: Path, data: dict[str, str]) -> Path:
    """A copy of the chart whose `lookup` of a Secret finds one holding ``data`` (key -> plain value), as on
    `helm upgrade` (or install over a kept Secret) against a cluster; helm-python-sdk renders offline."""
    copy = tmp_path / "colabel"
    shutil.copytree(CHART, copy)
    helpers = copy / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    assert text.count(SECRET_LOOKUP) == 1, "the chart's Secret lookup changed: update SECRET_LOOKUP"
    pairs = " ".join(f'"{k}" "{base64.b64encode(v.encode()).decode()}"' for k, v in data.items())
    helpers.write_text(text.replace(SECRET_LOOKUP, f'{{{{- $found := dict "data" (dict {pairs}) -}}}}'))
    return copy


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
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
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


def test_serve_config_runs_each_replicas_calls_in_threads_and_replaces_a_hung_replica_in_under_a_minute(
        documents):
    """The RayService's replicas run their sync methods in a thread pool (Ray 2.55 runs them one at a time on the
    replica's event loop otherwise) and are health-checked every 2 s with 5 s to answer (Ray's 10 s / 30 s held
    callers of a hung replica for about 2 minutes), as the deployments of `colabel serve` are."""
    from colabel.services.deployments import MODEL_DEPLOYMENTS, build_deployment

    config = yaml.safe_load(one(documents, "RayService")["spec"]["serveConfigV2"])
    deployments = [d for app in config["applications"] for d in app["deployments"]]
    assert len(deployments) == len(MODEL_DEPLOYMENTS)
    for deployment in deployments:
        options = deployment["ray_actor_options"]
        assert options["runtime_env"] == {"env_vars": {"RAY_SERVE_RUN_SYNC_IN_THREADPOOL": "1"}}, deployment["name"]
        assert (deployment["health_check_period_s"], deployment["health_check_timeout_s"]) == (2.0, 5.0)
        local = build_deployment(MODEL_DEPLOYMENTS[deployment["name"]])  # what `colabel serve` deploys
        assert local.ray_actor_options["runtime_env"] == options["runtime_env"]
        assert (local._deployment_config.health_check_period_s,
                local._deployment_config.health_check_timeout_s) == (2.0, 5.0)


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
        # only the Ray head mounts a ServiceAccount token: its autoscaler sidecar talks to the API server
        assert spec["automountServiceAccountToken"] is (name == "ray-head"), name
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


def test_only_the_autoscaling_head_mounts_a_service_account_token():
    # KubeRay's autoscaler sidecar reads /var/run/secrets/kubernetes.io/serviceaccount/token (Ray's
    # kuberay/node_provider.py); without the mount it crash-loops and the worker groups never scale
    for autoscaling in (True, False):
        documents = render({"ray": {"enableInTreeAutoscaling": autoscaling}})
        config = one(documents, "RayService")["spec"]["rayClusterConfig"]
        assert config["enableInTreeAutoscaling"] is autoscaling
        assert ("autoscalerOptions" in config) is autoscaling
        mounts = {name: spec["automountServiceAccountToken"] for name, spec in all_pod_specs(documents).items()}
        assert mounts == {"colabel-hypha": False, "colabel-gateway": False, "ray-head": autoscaling,
                          "ray-cpu": False}


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
    token = base64.b64decode(one(documents, "Secret")["data"]["root-token"]).decode()
    assert len(token) >= 64  # Hypha checks shorter ones for weak words, which a random one may contain


def test_a_given_root_token_of_64_characters_may_hold_weak_words():
    token = "abc123test" + "x" * 54
    documents = render({"hypha": {"rootToken": {"value": token}}})
    assert base64.b64decode(one(documents, "Secret")["data"]["root-token"]).decode() == token


def test_no_secret_is_written_into_any_pod(documents):
    data = one(documents, "Secret")["data"]
    secrets = [data["root-token"], data["jwt-secret"]]
    secrets += [base64.b64decode(s).decode() for s in secrets]
    for document in documents:
        if document["kind"] != "Secret":
            assert not any(s in yaml.safe_dump(document) for s in secrets), document["metadata"]["name"]


def test_hypha_signs_tokens_with_a_jwt_secret_from_the_secret(documents):
    # without HYPHA_JWT_SECRET, Hypha signs with a random key per start: every pod restart would invalidate the
    # tokens it issued (workspace tokens, manage URLs)
    secret = one(documents, "Secret")
    jwt_secret = base64.b64decode(secret["data"]["jwt-secret"]).decode()
    assert len(jwt_secret) >= 32
    assert jwt_secret != base64.b64decode(secret["data"]["root-token"]).decode()
    env = container_env(one(documents, "Deployment", "hypha"))
    assert env["HYPHA_JWT_SECRET"] == {"name": "HYPHA_JWT_SECRET", "valueFrom": {"secretKeyRef": {
        "name": secret["metadata"]["name"], "key": "jwt-secret"}}}
    assert "HYPHA_JWT_SECRET" not in container_env(one(documents, "Deployment", "gateway"))
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_secret_values_of_an_installed_release_are_kept(tmp_path):
    root, jwt = "colabel-" + "r" * 64, "j" * 64
    documents = render(chart=chart_with_cluster_secret(tmp_path, {"root-token": root, "jwt-secret": jwt}))
    data = one(documents, "Secret")["data"]
    assert base64.b64decode(data["root-token"]).decode() == root
    assert base64.b64decode(data["jwt-secret"]).decode() == jwt
    # the Secret of a release installed by an older chart has no jwt-secret yet: the root token stays, a new
    # random signing key is added (and kept from then on)
    documents = render(chart=chart_with_cluster_secret(tmp_path / "old", {"root-token": root}))
    data = one(documents, "Secret")["data"]
    assert base64.b64decode(data["root-token"]).decode() == root
    assert len(base64.b64decode(data["jwt-secret"]).decode()) >= 32
    # the same content renders the same pod checksums: an upgrade restarts nothing
    hypha, gateway = [[one(render(chart=chart_with_cluster_secret(tmp_path / f"{n}", {
        "root-token": root, "jwt-secret": jwt})), "Deployment", component)["spec"]["template"]["metadata"]
        ["annotations"]["checksum/secret"] for n in (f"{component}1", f"{component}2")]
        for component in ("hypha", "gateway")]
    assert hypha[0] == hypha[1] and gateway[0] == gateway[1]


def test_an_existing_secret_without_the_jwt_key_is_refused(tmp_path):
    chart = chart_with_cluster_secret(tmp_path, {"token": "colabel-" + "r" * 64})
    with pytest.raises(helm.HelmError, match='has no key "jwt-secret"'):
        render({"hypha": {"rootToken": {"existingSecret": "my-token", "secretKey": "token"}}}, chart=chart)
    chart = chart_with_cluster_secret(tmp_path / "ok", {"token": "colabel-" + "r" * 64, "jwt-secret": "j" * 64})
    documents = render({"hypha": {"rootToken": {"existingSecret": "my-token", "secretKey": "token"}}}, chart=chart)
    assert by_kind(documents, "Secret") == []


def test_an_upgrade_reusing_an_older_releases_values_renders():
    # `helm upgrade --reuse-values` renders with the values of the release's chart, without the keys added since;
    # a null value removes a default the same way
    documents = render({"ray": {"image": None, "networkPolicy": None}, "hypha": {"rootToken": {"jwtSecretKey": None}},
                        "gateway": {"startupTimeoutSeconds": None}}, variant="gpu")
    assert {spec["containers"][0]["image"] for spec in all_pod_specs(documents).values()} == {
        "ghcr.io/colabel/colabel:0.1.0"}
    assert set(one(documents, "Secret")["data"]) == {"root-token", "jwt-secret"}
    assert container_env(one(documents, "Deployment", "hypha"))["HYPHA_JWT_SECRET"]["valueFrom"]["secretKeyRef"][
        "key"] == "jwt-secret"
    startup = one(documents, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800
    assert one(documents, "NetworkPolicy")["spec"]["ingress"][0]["from"][-1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}}


def test_root_token_and_jwt_secret_need_two_keys():
    with pytest.raises(helm.HelmError, match="need two keys of the Secret"):
        render({"hypha": {"rootToken": {"jwtSecretKey": "root-token"}}})


def test_gateway_restarts_when_the_secret_changes(documents):
    # its COLABEL_TOKEN is read at container start only, as Hypha's HYPHA_ROOT_TOKEN
    for component in ("hypha", "gateway"):
        annotations = one(documents, "Deployment", component)["spec"]["template"]["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"]), component


def test_existing_secret_is_used_and_none_created():
    documents = render({"hypha": {"rootToken": {"existingSecret": "my-token", "secretKey": "token",
                                                "jwtSecretKey": "signing-key"}}})
    assert by_kind(documents, "Secret") == []
    refs = {}
    for component in ("hypha", "gateway"):
        container = one(documents, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]
        refs[component] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    assert refs == {"hypha": [{"name": "my-token", "key": "token"}, {"name": "my-token", "key": "signing-key"}],
                    "gateway": [{"name": "my-token", "key": "token"}]}


def test_gateway_attaches_to_the_rayservice_and_registers_on_hypha(documents):
    gateway = one(documents, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    args = gateway["args"]
    assert args[0] == "gateway" and "--attach" in args
    hypha_service = one(documents, "Service", "hypha")["metadata"]["name"]
    assert args[args.index("--server-url") + 1] == f"http://{hypha_service}:9527"
    rayservice = one(documents, "RayService")["metadata"]["name"]
    assert args[args.index("--ray-address") + 1] == f"ray://{rayservice}-head-svc:10001"
    # the root token reaches `colabel models` through COLABEL_TOKEN, never its command line (`ps` shows that)
    assert "--token" not in args and not any("$(" in a for a in gateway["command"] + args)
    env = {e["name"]: e for e in gateway["env"]}
    assert env["COLABEL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": one(documents, "Secret")["metadata"]["name"], "key": "root-token"}
    assert "ROOT_TOKEN" not in env
    # the image's entrypoint still runs the role, through tini, once the stale heartbeat file is gone
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    command = gateway["command"]
    assert command[:4] == entrypoint[:2] + ["/bin/sh", "-c"] and command[5:] == entrypoint[2:]
    assert command[4].endswith(f'exec {entrypoint[2]} "$@"')
    # the flags exist in `colabel models`
    from colabel.apps.cli import build_parser

    models_parser = build_parser()._subparsers._group_actions[0].choices["models"]
    known = {option for action in models_parser._actions for option in action.option_strings}
    unknown = {a for a in args if a.startswith("--")} - known
    assert unknown <= {"--heartbeat"}, unknown
    if unknown:  # being added to the CLI in parallel with this chart change
        pytest.xfail("`colabel models --heartbeat` is not in the CLI yet")


def test_gateway_probes_read_its_heartbeat_file(documents, tmp_path):
    spec = one(documents, "Deployment", "gateway")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = container["args"]
    heartbeat = args[args.index("--heartbeat") + 1]
    # on a writable emptyDir (the root filesystem is read-only)
    mount = next(m for m in container["volumeMounts"] if heartbeat.startswith(m["mountPath"].rstrip("/") + "/"))
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    commands = {kind: probe["exec"]["command"] for kind, probe in probes.items()}
    for kind, command in commands.items():
        assert command[:2] == ["/bin/sh", "-c"] and heartbeat in command[2], kind
        # only the shell and coreutils of the image's Debian base
        words = set(re.findall(r"(?:^|&&|\$\(|\()\s*([a-z]+)\b", command[2]))
        assert words <= {"test", "stat", "date"}, (kind, words)
    # a long first start (image pulls, weights): at least 30 minutes before the liveness probe takes over
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    custom = one(render({"gateway": {"startupTimeoutSeconds": 600}}), "Deployment", "gateway")
    startup = custom["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    # run the probes' commands against a file of this machine: missing, fresh, 45 s old, 90 s old
    sh = shutil.which("sh") or pytest.skip("no sh")
    path = tmp_path / "alive"

    def passes(kind: str) -> bool:
        script = commands[kind][2].replace(heartbeat, str(path))
        return subprocess.run([sh, "-c", script], capture_output=True).returncode == 0

    results = {}
    for state, age in (("missing", None), ("fresh", 0), ("45s", 45), ("90s", 90)):
        if age is not None:
            path.touch()
            now = time.time()
            os.utime(path, (now - age, now - age))
        results[state] = {kind: passes(kind) for kind in commands}
    assert results == {
        "missing": {"startupProbe": False, "readinessProbe": False, "livenessProbe": False},
        "fresh": {"startupProbe": True, "readinessProbe": True, "livenessProbe": True},
        "45s": {"startupProbe": True, "readinessProbe": False, "livenessProbe": True},
        "90s": {"startupProbe": False, "readinessProbe": False, "livenessProbe": False},
    }


def test_gateway_models_are_model_deployments():
    from colabel.services.deployments import MODEL_DEPLOYMENTS

    schema = json_schema()
    pattern = schema["properties"]["gateway"]["properties"]["models"]["pattern"]
    assert set(re.findall(r"[a-z]+", pattern)) == set(MODEL_DEPLOYMENTS)
    assert re.fullmatch(pattern, ",".join(MODEL_DEPLOYMENTS))
    for models in ("sam", "coreset,sam"):
        gateway = one(render({"gateway": {"models": models}}), "Deployment", "gateway")
        args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--models") + 1] == models


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


def json_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("values, variant, message", [
    ({"ray": {"cpuWorkers": {"minReplicas": 5, "maxReplicas": 2, "replicas": 2}}}, "default",
     r"ray.cpuWorkers: minReplicas \(5\) is greater than maxReplicas \(2\)"),
    ({"ray": {"gpu": {"minReplicas": 12}}}, "gpu", r"ray.gpu: minReplicas \(12\) is greater than maxReplicas \(10\)"),
    ({"ray": {"cpuWorkers": {"replicas": 0}}}, "default",
     r"ray.cpuWorkers: replicas \(0\) must lie between minReplicas \(1\) and maxReplicas \(4\)"),
    ({"ray": {"gpu": {"replicas": 11}}}, "gpu",
     r"ray.gpu: replicas \(11\) must lie between minReplicas \(3\) and maxReplicas \(10\)"),
    ({"ray": {"cpuWorkers": {"enabled": False}}}, "default", "no Ray worker group is enabled"),
    ({"ray": {"cpuWorkers": {"enabled": False}, "head": {"rayNumCpus": 0}}}, "default",
     "no Ray worker group is enabled"),
])
def test_impossible_worker_groups_are_refused(values, variant, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values, variant=variant)


def test_worker_group_settings_that_can_work_render():
    # a head with CPUs may run the replicas itself; a GPU group alone has CPUs for coreset
    crd = yaml.safe_load(CRD.read_text()) if CRD.exists() else pytest.skip(f"{CRD} not found")
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    rayservice = one(render({"ray": {"cpuWorkers": {"enabled": False}, "head": {"rayNumCpus": 4}}}), "RayService")
    jsonschema.Draft7Validator(schema).validate(rayservice)
    config = rayservice["spec"]["rayClusterConfig"]
    assert "workerGroupSpecs" not in config and config["headGroupSpec"]["rayStartParams"]["num-cpus"] == "4"
    config = one(render({"ray": {"cpuWorkers": {"enabled": False}}}, variant="gpu"),
                 "RayService")["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in config["workerGroupSpecs"]] == ["gpu"]
    config = one(render({"ray": {"cpuWorkers": {"replicas": 4, "minReplicas": 4, "maxReplicas": 4}}}),
                 "RayService")["spec"]["rayClusterConfig"]
    assert config["workerGroupSpecs"][0]["replicas"] == 4


@pytest.mark.parametrize("cpus, expected", [("0", "0"), (0, "0"), (2, "2"), ("3", "3")])
def test_head_cpus_may_be_a_string_or_an_integer(cpus, expected):
    # `helm --set ray.head.rayNumCpus=1` makes an integer
    head = one(render({"ray": {"head": {"rayNumCpus": cpus}}}), "RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == expected


def test_network_policy_admits_only_the_gateway_ray_pods_and_the_operator(documents, variant):
    policy = one(documents, "NetworkPolicy")
    spec = policy["spec"]
    labels = all_pod_labels(documents)
    ray_pods = {name for name in labels if name.startswith("ray-")}
    assert ray_pods == ({"ray-head", "ray-cpu", "ray-gpu"} if variant == "gpu" else {"ray-head", "ray-cpu"})
    # it applies to every Ray pod and to nothing else
    assert {name for name, pod in labels.items() if selects(spec["podSelector"], pod)} == ray_pods
    assert spec["policyTypes"] == ["Ingress"]
    assert len(spec["ingress"]) == 1 and "ports" not in spec["ingress"][0]
    peers = spec["ingress"][0]["from"]
    # peers in the release's namespace: the Ray pods and the gateway, not Hypha
    local = [p["podSelector"] for p in peers if "namespaceSelector" not in p]
    admitted = {name for name, pod in labels.items() if any(selects(s, pod) for s in local)}
    assert admitted == ray_pods | {"colabel-gateway"}
    # and the KubeRay operator's namespace (configurable)
    remote = [p for p in peers if "namespaceSelector" in p]
    assert remote == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}}]
    documents = render({"ray": {"networkPolicy": {"operatorNamespace": "kuberay-system",
                                                  "operatorPodLabels": {"app.kubernetes.io/name": "kuberay-operator"},
                                                  "extraIngress": [{"ports": [{"port": 8080}]}]}}})
    policy = one(documents, "NetworkPolicy")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    remote = [p for p in policy["spec"]["ingress"][0]["from"] if "namespaceSelector" in p]
    assert remote == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                       "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert policy["spec"]["ingress"][1] == {"ports": [{"port": 8080}]}
    assert by_kind(render({"ray": {"networkPolicy": {"enabled": False}}}), "NetworkPolicy") == []


def test_only_the_ray_pods_run_the_ray_image(documents, variant):
    images = {name: spec["containers"][0]["image"] for name, spec in all_pod_specs(documents).items()}
    cpu_image = "ghcr.io/colabel/colabel:0.1.0"
    assert images["colabel-hypha"] == images["colabel-gateway"] == cpu_image
    ray_image = "ghcr.io/colabel/colabel:0.1.0-cu128" if variant == "gpu" else cpu_image
    assert {images[name] for name in images if name.startswith("ray-")} == {ray_image}
    images = {name: spec["containers"][0]["image"] for name, spec in all_pod_specs(render(
        {"image": {"repository": "reg/colabel", "tag": "1.0"}, "ray": {"image": {"repository": "reg/colabel-ray"}}}
    )).items()}
    assert images == {"colabel-hypha": "reg/colabel:1.0", "colabel-gateway": "reg/colabel:1.0",
                      "ray-head": "reg/colabel-ray:1.0", "ray-cpu": "reg/colabel-ray:1.0"}


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
    ({"gateway": {"models": "sam,segformer"}}, "models"),
    ({"gateway": {"models": ""}}, "models"),
    ({"ray": {"shmSize": "lots"}}, "shmSize"),
    ({"ray": {"head": {"rayNumCpus": "two"}}}, "rayNumCpus"),
    ({"ray": {"head": {"rayNumCpus": -1}}}, "rayNumCpus"),
    ({"hypha": {"ingress": {"enabled": True, "host": ""}}}, "host"),
    ({"containerSecurityContext": {"runAsUser": 0}}, "runAsUser"),
    ({"ray": {"image": {"tags": "x"}}}, "tags"),
    ({"ray": {"networkPolicy": {"operatorNamespace": ""}}}, "operatorNamespace"),
])
def test_schema_refuses_bad_values(values, where):
    with pytest.raises(helm.HelmError, match=where):
        render(values)


def test_notes_render():
    notes = helm.Chart.load(str(CHART)).render(None, name="colabel", namespace="lab")["colabel/templates/NOTES.txt"]
    assert "colabel cluster status -n lab --release colabel" in notes and "colabel-hypha" in notes


def test_notes_give_providers_a_workspace_token_not_the_root_token():
    notes = helm.Chart.load(str(CHART)).render(None, name="colabel", namespace="lab")["colabel/templates/NOTES.txt"]
    # the root token is read into the operator's COLABEL_TOKEN, from which `colabel token` makes a scoped one
    assert "export COLABEL_TOKEN=$(kubectl -n lab get secret colabel-root-token" in notes
    assert "colabel token --server-url <Hypha URL> --workspace ws-user-root" in notes
    assert ("export HYPHA_JWT_SECRET=$(kubectl -n lab get secret colabel-root-token -o jsonpath='{.data.jwt-secret}'"
            in notes)
    serve = next(line for line in notes.splitlines() if "colabel serve FOLDER" in line)
    assert "--token <provider token>" in serve and "--models-token <provider token>" in serve
    assert "ray.networkPolicy.operatorNamespace" in notes


def test_dockerfile_runs_every_role_as_non_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM node:\S+ AS web$", dockerfile, re.M)
    assert re.search(r"^USER 1000(:1000)?$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "ENTRYPOINT" in dockerfile
    assert "torch==${TORCH_VERSION}" in dockerfile and "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "for e in ('server', 'models', 'hals')" in dockerfile
    for role in ("hypha)", "gateway)", "provider)"):
        assert role in dockerfile
    assert "uvicorn colabel.apps.hypha_gate:app" in dockerfile and "--ws-per-message-deflate false" in dockerfile
    assert "--mount=type=cache" in dockerfile


def test_dockerfile_installs_dependencies_before_copying_the_sources():
    dockerfile = (ROOT / "Dockerfile").read_text()
    build = dockerfile[dockerfile.index(" AS build"):dockerfile.index(" AS runtime")]
    # instructions, with their continuation lines joined
    instructions = [line for line in build.replace("\\\n", " ").splitlines() if re.match(r"(COPY|RUN) ", line)]
    # only pyproject.toml comes before the layer that installs the dependencies, the sources after it
    deps_layer = next(i for i, line in enumerate(instructions)
                      if line.startswith("RUN ") and "pip install -r /tmp/requirements.txt" in line)
    assert [c for c in instructions[:deps_layer] if c.startswith("COPY ")] == ["COPY pyproject.toml ./"]
    assert instructions.index("COPY colabel/ colabel/") > deps_layer
    deps = build[build.index("COPY pyproject.toml ./"):build.index("COPY colabel/")]
    assert "pip install -r /tmp/requirements.txt" in deps and "optional-dependencies" in deps
    after = build[build.index("COPY colabel/"):]
    assert "pip install --no-deps ." in after and "pip check" in after
    # every COPY source of the build context exists and is not excluded by .dockerignore
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for line in re.findall(r"^COPY .*$", dockerfile, re.M):
        if "--from=" in line or "<<" in line:
            continue
        for source in line.split()[1:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, source


def test_docs_gateway_example_attaches():
    docs = (ROOT / "docs" / "deployment.md").read_text()
    gateway_runs = [line for line in docs.splitlines() if re.search(r"docker run .*IMAGE gateway", line)]
    assert gateway_runs and all("--attach" in line and "--token" not in line for line in gateway_runs)
