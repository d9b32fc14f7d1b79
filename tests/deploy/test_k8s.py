"""The Kubernetes manifests in deploy/k8s, checked rather than just written: every object against
Kubernetes' own schemas (kubernetes-validate, offline, strict), what they say about charstream
against charstream itself (the probes' routes, the shutdown timings, the settings they set, the
autoscaler's metric and the Sentinel variant's store URL), and how they are locked down: every
container's securityContext, images tagged by version, Redis behind a password and a
NetworkPolicy, the API key from a Secret, the ingress on HTTPS for a named host, and every Secret
they need named in docs/deploy.md.

kubeconform and kube-linter are not packaged for PyPI, npm or Debian, so kubernetes-validate's
strict schemas are the schema check, and the security rules are written out here."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from prometheus_client import generate_latest

from service.api.app import create_app
from service.metrics import Metrics
from service.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
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


# What the Secrets hold, for reading the manifests' environment as a pod would see it.
SECRET_VALUES = {("charstream", "api-key"): "k" * 32, ("redis", "password"): "0123456789abcdef" * 2}


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: Secrets read, and $(NAME) replaced by
    the value of a variable defined earlier in the list."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SECRET_VALUES[(ref["name"], ref["key"])]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    return env


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variable name -> (Secret, key) for each variable read from a Secret."""
    return {
        var["name"]: (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for var in container.get("env", [])
        if "valueFrom" in var
    }


def _with_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge of a patch that sets container env values (what kustomize does with it: a
    variable already there keeps its place, so what it refers to stays defined before it)."""
    merged = copy.deepcopy(base)
    for patched in patch["spec"]["template"]["spec"]["containers"]:
        target = next(c for c in merged["spec"]["template"]["spec"]["containers"] if c["name"] == patched["name"])
        for var in patched.get("env", []):
            names = [e["name"] for e in target["env"]]
            if var["name"] in names:
                target["env"][names.index(var["name"])] = var
            else:
                target["env"].append(var)
    return merged


def _sentinel_charstream() -> dict[str, Any]:
    return _with_patch(_find("Deployment", "charstream"), _objects(K8S / "sentinel" / "charstream-store.yaml")[0])


def _workloads() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object that runs pods, with the file it is in."""
    for path in _manifests():
        for obj in _objects(path):
            if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                yield path, obj


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _selects(policy: dict[str, Any], workload: dict[str, Any]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return bool(wanted.items() <= workload["spec"]["template"]["metadata"]["labels"].items())


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
    "deployment", [_find("Deployment", "charstream"), _sentinel_charstream()], ids=["redis", "sentinel"]
)
def test_every_setting_the_manifests_set_is_one_charstream_reads(deployment: dict[str, Any]) -> None:
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container = _container(deployment)
    env = _env(container)
    spelled = " ".join(str(var.get("value", "")) for var in container["env"])
    overrides = {}
    for name, value in env.items():
        if not name.startswith("CHARSTREAM_"):  # a part of another variable's value, nothing else
            assert f"$({name})" in spelled, name
            continue
        field = name.removeprefix("CHARSTREAM_").lower()
        assert field in Settings.model_fields, name
        overrides[field] = value
    load_settings(**overrides)  # each value is one the service accepts (a bad one raises ServiceConfigError)


@pytest.mark.parametrize(
    "deployment", [_find("Deployment", "charstream"), _sentinel_charstream()], ids=["redis", "sentinel"]
)
def test_the_keys_come_from_secrets(deployment: dict[str, Any]) -> None:
    """The API key (without one the server does not listen beyond loopback) and Redis's password
    come from Secrets, and the store URL carries the password Redis is started with."""
    container = _container(deployment)
    refs = _secret_refs(container)
    assert refs["CHARSTREAM_API_KEY"] == ("charstream", "api-key")
    assert _env(container)["CHARSTREAM_HOST"] == "0.0.0.0"
    store = _env(container)["CHARSTREAM_SESSION_STORE"]
    assert store.startswith(("redis://:", "redis+sentinel://:"))
    assert f":{SECRET_VALUES[('redis', 'password')]}@" in store
    assert refs["REDIS_PASSWORD"] == ("redis", "password")
    assert all(var.get("value") != SECRET_VALUES[ref] for var in container["env"] for ref in SECRET_VALUES)


def test_every_redis_needs_the_password() -> None:
    """Every data server and sentinel is started with the password from the Secret `redis`: servers
    with requirepass (replicas also with masterauth), sentinels with requirepass and auth-pass."""
    servers = 0
    for path, workload in _workloads():
        for container in _containers(workload):
            if not container["image"].startswith("redis:"):
                continue
            assert "--protected-mode" not in " ".join(container.get("command", []) + container.get("args", []))
            refs = _secret_refs(container)
            if container["name"] == "sentinel":
                assert refs["REDISCLI_AUTH"] == ("redis", "password")  # its probe; the config is the init's
                continue
            assert refs["REDIS_PASSWORD"] == ("redis", "password"), (path, container["name"])
            line = " ".join(container.get("command", []) + container.get("args", []))
            if container["name"] == "config":  # the sentinels' configuration, written at start
                assert "sentinel auth-pass charstream %s" in line and "requirepass %s" in line
                continue
            servers += 1
            assert re.search(r"--requirepass \S*\$\(?REDIS_PASSWORD", line), line
            if "--replicaof" in line:
                assert re.search(r"--masterauth \S*\$\(?REDIS_PASSWORD", line), line
            assert refs["REDISCLI_AUTH"] == ("redis", "password")  # redis-cli in the probes
    assert servers == 2  # redis.yaml and the Sentinel variant's StatefulSet


def test_every_container_is_locked_down() -> None:
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem and the
    runtime's seccomp profile, on every container and init container of every workload."""
    wanted = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    seen = 0
    for path, workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, path
        assert pod.get("automountServiceAccountToken") is False, path
        for container in _containers(workload):
            context = container.get("securityContext", {})
            for field, value in wanted.items():
                assert context.get(field) == value, (path.name, container["name"], field)
            assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, container["name"]
            seen += 1
    assert seen == 5  # charstream, Redis, Redis under Sentinel, the sentinel and its config step


def test_charstream_runs_as_the_images_user_with_a_writable_tmp() -> None:
    uid = int(re.search(r"useradd --uid (\d+)", (REPO / "Dockerfile").read_text())[1])  # type: ignore[index]
    deployment = _find("Deployment", "charstream")
    assert _container(deployment)["securityContext"]["runAsUser"] == uid
    mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_images_are_tagged_by_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for path, workload in _workloads():
        for container in _containers(workload):
            name, _, tag = container["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, (path.name, container["image"])
            if name.endswith("charstream"):
                assert tag == version, container["image"]


def _policy_sources(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]


@pytest.mark.parametrize(
    "path", [K8S / "redis.yaml", K8S / "sentinel" / "redis-sentinel.yaml"], ids=["redis", "sentinel"]
)
def test_network_policies_admit_only_charstream_and_redis_itself(path: Path) -> None:
    """Each Redis pod and sentinel is selected by a NetworkPolicy admitting pods of this namespace
    only: charstream's, and (under Sentinel) the sentinels and the servers' own replication."""
    objects = _objects(path)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    charstream_labels = _find("Deployment", "charstream")["spec"]["template"]["metadata"]["labels"]
    for workload in workloads:
        selecting = [p for p in policies if _selects(p, workload)]
        assert len(selecting) == 1, workload["metadata"]["name"]
        policy = selecting[0]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        peers = _policy_sources(policy)
        assert all(set(peer) == {"podSelector"} for peer in peers), peers  # no namespace, no address block
        admitted = [peer["podSelector"]["matchLabels"] for peer in peers]
        assert any(labels.items() <= charstream_labels.items() for labels in admitted)
        assert {labels["app"] for labels in admitted} <= {"charstream", "redis", "redis-sentinel"}
        ports = {
            port["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"] for port in c["ports"]
        }
        assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == ports


def test_charstream_admits_the_ingress_controller_and_prometheus_only() -> None:
    """Client traffic from the ingress controller's namespace; from the monitoring namespace, only
    Prometheus's pods (the autoscaler's metric is scraped from the replicas)."""
    deployment = _find("Deployment", "charstream")
    policy = _find("NetworkPolicy", "charstream")
    assert _selects(policy, deployment) and policy["spec"]["policyTypes"] == ["Ingress"]
    admitted = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]: peer.get("podSelector")
        for peer in _policy_sources(policy)
    }
    assert admitted == {
        "ingress-nginx": None,
        "monitoring": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert ports == {p["containerPort"] for p in _container(deployment)["ports"]}


def test_the_ingress_serves_one_host_over_tls() -> None:
    ingress = _find("Ingress", "charstream", K8S / "ingress.yaml")
    tls_hosts = {host for entry in ingress["spec"]["tls"] for host in entry["hosts"]}
    assert all(entry["secretName"] for entry in ingress["spec"]["tls"])
    rule_hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert rule_hosts == tls_hosts == {"charstream.example.com"}


def test_every_secret_the_manifests_need_is_in_the_docs() -> None:
    """docs/deploy.md says how to make each Secret the manifests read, with the keys they read."""
    docs = (REPO / "docs" / "deploy.md").read_text()
    refs = {ref for _, w in _workloads() for c in _containers(w) for ref in _secret_refs(c).values()}
    assert refs == set(SECRET_VALUES)
    for name, key in refs:
        assert re.search(rf"kubectl create secret generic {name} [^\n]*--from-literal={key}=", docs), (name, key)
    for entry in _find("Ingress", "charstream", K8S / "ingress.yaml")["spec"]["tls"]:
        assert f"kubectl create secret tls {entry['secretName']} " in docs


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
