"""The Kubernetes manifests in deploy/k8s, checked rather than just written: every object against
Kubernetes' own schemas (kubernetes-validate, offline, strict), and what they say about charstream
against charstream itself: the probes' routes, the shutdown timings, the settings they set, the
autoscaler's metric and the Sentinel variant's store URL."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from service.api.app import create_app
from service.metrics import Metrics
from service.settings import Settings, load_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise (preStop `sleep` is beta there)
UVICORN_CLOSE_S = 5  # service/server.py: uvicorn's own close of what is left after the drain


def _objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in ("kustomization.yaml", "charstream-store.yaml"))


def _find(kind: str, name: str, path: Path = K8S / "charstream.yaml") -> dict[str, Any]:
    return next(o for o in _objects(path) if o["kind"] == kind and o["metadata"]["name"] == name)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def _with_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge of a patch that sets container env values (what kustomize does with it)."""
    merged = copy.deepcopy(base)
    for patched in patch["spec"]["template"]["spec"]["containers"]:
        target = next(c for c in merged["spec"]["template"]["spec"]["containers"] if c["name"] == patched["name"])
        for var in patched.get("env", []):
            target["env"] = [e for e in target["env"] if e["name"] != var["name"]] + [var]
    return merged


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_object_is_valid_for_kubernetes(path: Path) -> None:
    objects = _objects(path)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_strict_schema_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_find("Deployment", "charstream"))
    _container(deployment)["readinessProbe"]["httpGett"] = {"path": "/readyz", "port": "http"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_reach_the_service_routes() -> None:
    container = _container(_find("Deployment", "charstream"))
    paths = create_app(Settings()).openapi()["paths"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    port = next(p for p in container["ports"] if p["name"] == container["readinessProbe"]["httpGet"]["port"])
    assert port["containerPort"] == Settings().port


def test_termination_grace_covers_the_pre_stop_and_the_drain() -> None:
    deployment = _find("Deployment", "charstream")
    container = _container(deployment)
    grace = load_settings(shutdown_grace_s=float(_env(container)["CHARSTREAM_SHUTDOWN_GRACE_S"])).shutdown_grace_s
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + grace + UVICORN_CLOSE_S


@pytest.mark.parametrize(
    "deployment",
    [
        _find("Deployment", "charstream"),
        _with_patch(_find("Deployment", "charstream"), _objects(K8S / "sentinel" / "charstream-store.yaml")[0]),
    ],
    ids=["redis", "sentinel"],
)
def test_every_setting_the_manifests_set_is_one_charstream_reads(deployment: dict[str, Any]) -> None:
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    env = _env(_container(deployment))
    overrides = {}
    for name, value in env.items():
        field = name.removeprefix("CHARSTREAM_").lower()
        assert name.startswith("CHARSTREAM_") and field in Settings.model_fields, name
        overrides[field] = value
    load_settings(**overrides)  # each value is one the service accepts (a bad one raises ServiceConfigError)


def test_the_disruption_budget_and_the_autoscaler_target_the_deployment() -> None:
    deployment = _find("Deployment", "charstream")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = _find("PodDisruptionBudget", "charstream")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    autoscaler = _find("HorizontalPodAutoscaler", "charstream")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "charstream")
    assert autoscaler["spec"]["minReplicas"] >= deployment["spec"]["replicas"] - budget["spec"]["maxUnavailable"]


def test_the_autoscaler_metric_is_served_from_metrics_charstream_exports() -> None:
    autoscaler = _find("HorizontalPodAutoscaler", "charstream")
    wanted = autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(
        _find("ConfigMap", "prometheus-adapter", K8S / "prometheus-adapter.yaml")["data"]["config.yaml"]
    )
    rule = next(r for r in adapter["rules"] if r["name"]["as"] == wanted)
    queried = set(re.findall(r"(charstream:[a-z_]+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert queried == {"charstream:num_requests_running", "charstream:num_requests_waiting"}
    metrics = Metrics()
    metrics.running.labels("m").set(3)
    metrics.waiting.labels("m").set(1)
    exported = generate_latest(metrics.registry).decode()
    for name in queried:
        assert re.search(rf"^{re.escape(name)}\{{", exported, re.M), name
