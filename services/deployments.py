"""The model deployments: one definition used by `colabel serve` (local Ray or in-process) and the Helm chart.

Each :class:`ModelDeployment` names a plain model-service class (no Ray, no Hypha imports), its autoscaling
limits and its resources. :func:`build_deployment` turns it into a Ray Serve deployment,
:func:`app_builder` is the Serve *application builder* that ``serveConfigV2`` of the chart's RayService points
at, and :func:`serve_config` writes that ``serveConfigV2`` from the same definitions, so the cluster and a
laptop cannot drift apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any


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
    max_ongoing_requests : requests one replica accepts at once.
    options : keyword arguments for the class (JSON-able; the chart passes them as Serve ``args``).
    """

    name: str
    class_path: str
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    num_cpus: float = 0.25
    wants_gpu: bool = False
    max_ongoing_requests: int = 8
    options: dict = field(default_factory=dict)

    def load_class(self) -> type:
        module, _, attr = self.class_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def ray_actor_options(self, *, gpu: bool) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": 1 if (gpu and self.wants_gpu) else 0}

    def with_options(self, **options: Any) -> "ModelDeployment":
        return replace(self, options={**self.options, **options})


#: Every model service colabel runs. Tests and the chart read this; nothing else lists them.
MODEL_DEPLOYMENTS: dict[str, ModelDeployment] = {
    d.name: d
    for d in (
        ModelDeployment("sam", "colabel.services.sam.service:SamService",
                        Autoscaling(1, 4, 2), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=16),
        ModelDeployment("nuclei", "colabel.services.nuclei.service:NucleiService",
                        Autoscaling(1, 3, 1), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=4),
        ModelDeployment("classifier", "colabel.services.hals.service:ClassifierService",
                        Autoscaling(1, 3, 2), num_cpus=0.5, wants_gpu=True, max_ongoing_requests=8),
        ModelDeployment("coreset", "colabel.services.hals.service:CoresetService",
                        Autoscaling(1, 2, 2), num_cpus=0.25, max_ongoing_requests=4),
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
                "ray_actor_options": spec.ray_actor_options(gpu=gpu),
            }],
        })
    return {"proxy_location": "Disabled", "applications": applications}
