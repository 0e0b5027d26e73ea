"""The deployment recipes in deploy/: the Kubernetes manifests are valid against the
Kubernetes API's schemas (offline, kubernetes-validate), the Sprox arguments in them are
a configuration Sprox accepts, and the balancer in the Kubernetes tier proxies as the
nginx recipe that tests/functional/test_tier.py runs."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sprox.config import load

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.31"  # the oldest release still supported upstream when written


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def sprox_containers(path: Path) -> list[dict]:
    return [c for doc in documents(path) if doc["kind"] in ("StatefulSet", "DaemonSet", "Deployment")
            for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "sprox"]


def test_there_are_both_forms():
    assert {p.name for p in MANIFESTS} == {"tier.yaml", "node-local.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_sprox_arguments_are_a_valid_configuration_with_probes(path: Path):
    containers = sprox_containers(path)
    assert containers
    for container in containers:
        flags = {}
        for arg in container["args"]:
            name, _, value = arg.removeprefix("--").partition("=")
            flags[name.replace("-", "_")] = value
        env = {e["name"]: "x" for e in container.get("env", [])}  # (the Secret's values)
        config = load(flags, environ=env)
        assert config.host == "0.0.0.0" and config.auth_mode == "sigv4"
        assert container["readinessProbe"]["httpGet"]["path"] == "/_sprox/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/_sprox/live"
        assert container["ports"][0]["containerPort"] == config.port


def _proxy_directives(text: str) -> list[str]:
    return sorted(" ".join(line.partition("#")[0].split()) for line in text.splitlines()
                  if re.match(r"\s*(proxy_|client_max_body_size|hash |keepalive )", line))


def test_the_kubernetes_balancer_proxies_as_the_tested_nginx_recipe():
    (config_map,) = [d for d in documents(DEPLOY / "kubernetes" / "tier.yaml") if d["kind"] == "ConfigMap"]
    in_kubernetes = config_map["data"]["nginx.conf"]
    assert _proxy_directives(in_kubernetes) == _proxy_directives((DEPLOY / "nginx" / "sprox-tier.conf").read_text())
    (statefulset,) = [d for d in documents(DEPLOY / "kubernetes" / "tier.yaml") if d["kind"] == "StatefulSet"]
    servers = re.findall(r"server (sprox-\d+)\.", in_kubernetes)
    assert servers == [f"sprox-{i}" for i in range(statefulset["spec"]["replicas"])]
