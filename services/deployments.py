"""The model deployments: one definition used by `colabel serve` (local Ray or in-process) and the Helm chart.

Each :class:`ModelDeployment` names a plain model-service class (no Ray, no Hypha imports), its autoscaling
limits and its resources. :func:`build_deployment` turns it into a Ray Serve deployment,
:func:`app_builder` is the Serve *application builder* that ``serveConfigV2`` of the chart's RayService points
at, and :func:`serve_config` writes that ``serveConfigV2`` from the same definitions, so the cluster and a
laptop cannot drift apart.

Per replica, Serve runs the classes' (sync) methods in a thread pool, up to ``max_ongoing_requests`` calls at
once (:data:`REPLICA_ENV`, in each deployment's ``runtime_env``); without it Ray 2.55 runs them on the replica's
event loop, one at a time. The classes are thread-safe: their caches and model pools take locks, and each SAM
model runs one torch call at a time under its own lock (``SamSegmenter``), so prompts are decoded between the
batches of a long ``generate`` and during an ONNX export. Serve checks every replica every
:data:`HEALTH_CHECK_PERIOD_S` seconds and replaces one that fails 3 checks in a row (each given
:data:`HEALTH_CHECK_TIMEOUT_S`): a hung replica is replaced in about 35-40 s.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

#: Environment of every replica: Serve runs sync methods in a thread pool (as many threads as the deployment's
#: ``max_ongoing_requests``), not on the replica's event loop one call at a time (Ray 2.55's default).
REPLICA_ENV = {"RAY_SERVE_RUN_SYNC_IN_THREADPOOL": "1"}

#: Serve's health check of each replica: every 2 s, 5 s to answer; after 3 failures in a row Serve stops the replica
#: (giving it its 20 s graceful shutdown) and starts another: a hung replica is replaced in about 35-40 s (37 s
#: measured on a loaded 2-core machine; Ray's defaults, 10 s and 30 s, took about 2 minutes, 52 s with 2 s and 10 s).
#: The replicas' event loop answers it while their calls run in threads (:data:`REPLICA_ENV`).
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 5.0

#: How long the gateway waits for one call (:class:`~colabel.services.gateway.RayBackend`): a call whose cost
#: does not grow with its input (``segment``, ``info``, ``ping``), and one whose does (``embed``, ``generate``,
#: an ONNX export, nucleus segmentation of a whole image, features, training, Coreset over many cells).
SHORT_CALL_S = 60.0
LONG_CALL_S = 3600.0


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve autoscaling limits: replicas between ``min_replicas`` and ``max_replicas``, scaled to keep
    ``target_ongoing_requests`` requests in flight per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0

    def as_dict(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclass(frozen=True)
class ModelDeployment:
    """One model service.

    Attributes
    ----------
    name : deployment and Serve application name, and the suffix of its Hypha service id.
    class_path : ``"module:Class"`` of the plain model-service class.
    autoscaling : replica limits.
    num_cpus : CPUs reserved per replica (fractional: several replicas share a core).
    wants_gpu : give each replica one GPU when the cluster has GPUs.
    max_ongoing_requests : requests one replica accepts at once, and runs at once (in its thread pool).
    options : keyword arguments for the class (JSON-able; the chart passes them as Serve ``args``).
    long_calls : methods whose cost grows with their input: the gateway waits :data:`LONG_CALL_S` for them,
        :data:`SHORT_CALL_S` for the others (:meth:`call_deadline`).
    """

    name: str
    class_path: str
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    num_cpus: float = 0.25
    wants_gpu: bool = False
    max_ongoing_requests: int = 8
    options: dict = field(default_factory=dict)
    long_calls: tuple[str, ...] = ()

    def load_class(self) -> type:
        module, _, attr = self.class_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def ray_actor_options(self, *, gpu: bool) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": 1 if (gpu and self.wants_gpu) else 0,
                "runtime_env": {"env_vars": dict(REPLICA_ENV)}}

    def call_deadline(self, method: str) -> float:
        """Seconds the gateway waits for one call of ``method``."""
        return LONG_CALL_S if method in self.long_calls else SHORT_CALL_S

    def with_options(self, **options: Any) -> "ModelDeployment":
        return replace(self, options={**self.options, **options})


#: Every model service colabel runs. Tests and the chart read this; nothing else lists them.
MODEL_DEPLOYMENTS: dict[str, ModelDeployment] = {
    d.name: d
    for d in (
        ModelDeployment("sam", "colabel.services.sam.service:SamService",
                        Autoscaling(1, 4, 2), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=16,
                        long_calls=("embed", "compute_embedding", "generate", "segment_image", "get_onnx_model")),
        ModelDeployment("nuclei", "colabel.services.nuclei.service:NucleiService",
                        Autoscaling(1, 3, 1), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=4,
                        long_calls=("segment",)),
        ModelDeployment("classifier", "colabel.services.hals.service:ClassifierService",
                        Autoscaling(1, 3, 2), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=8,
                        long_calls=("features", "fit", "predict")),
        ModelDeployment("coreset", "colabel.services.hals.service:CoresetService",
                        Autoscaling(1, 2, 2), num_cpus=0.25, max_ongoing_requests=4,
                        long_calls=("select", "next_patch")),
    )
}


def get_deployment(name: str) -> ModelDeployment:
    try:
        return MODEL_DEPLOYMENTS[name]
    except KeyError:
        raise KeyError(f"unknown model service {name!r}; known: {sorted(MODEL_DEPLOYMENTS)}") from None


def build_deployment(spec: ModelDeployment, *, gpu: bool = False, autoscaling: Autoscaling | None = None):
    """The Ray Serve deployment of ``spec`` (imports ray)."""
    from ray import serve

    scaling = autoscaling or spec.autoscaling
    return serve.deployment(
        spec.load_class(),
        name=spec.name,
        ray_actor_options=spec.ray_actor_options(gpu=gpu),
        autoscaling_config=scaling.as_dict(),
        max_ongoing_requests=spec.max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    )


def app_builder(args: dict):
    """Serve application builder: ``import_path: colabel.services.deployments:app_builder``.

    ``args``: ``{"service": name, "gpu": bool, "options": {...}}``; returns the bound application.
    """
    spec = get_deployment(args["service"]).with_options(**args.get("options", {}))
    return build_deployment(spec, gpu=bool(args.get("gpu", False))).bind(**spec.options)


def serve_config(names: list[str] | None = None, *, gpu: bool = False, options: dict | None = None) -> dict:
    """``serveConfigV2`` for a RayService: one application per model service, from the same definitions.

    ``options`` maps a service name to extra class options (e.g. a cache folder on the cluster's volume).
    """
    applications = []
    for name in names or list(MODEL_DEPLOYMENTS):
        spec = get_deployment(name)
        args = {"service": name, "gpu": gpu, "options": {**spec.options, **(options or {}).get(name, {})}}
        applications.append({
            "name": name,
            "route_prefix": None,
            "import_path": "colabel.services.deployments:app_builder",
            "args": args,
            "deployments": [{
                "name": spec.name,
                "autoscaling_config": spec.autoscaling.as_dict(),
                "max_ongoing_requests": spec.max_ongoing_requests,
                "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
                "ray_actor_options": spec.ray_actor_options(gpu=gpu),
            }],
        })
    return {"proxy_location": "Disabled", "applications": applications}
