"""The deployment, checked offline: Kubernetes manifests against the API schemas (strict), the
choices that keep the broker available and locked down, and the Dockerfile under hadolint."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.config import Settings
from tests.processes import BIN

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
SETTINGS = {f"BROKER_{name.upper()}" for name in Settings.model_fields}
CLOSE_SECONDS = 5  # after the grace: background tasks, the store, the AWS client


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> dict[str, Any]:
    return next(doc for doc in documents() if doc["kind"] == name)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_deployment_is_available_and_locked_down() -> None:
    deployment = kind("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 8081, probe
    assert container["readinessProbe"]["grpc"]["service"] == "broker.v1.CredentialBroker"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    grace = Settings.model_fields["shutdown_grace"].default
    assert pod["terminationGracePeriodSeconds"] > grace
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= SETTINGS, f"not settings: {set(env) - SETTINGS}"
    assert "secretKeyRef" in env["BROKER_DATABASE_URL"]["valueFrom"], "the URL holds a password"
    assert env["BROKER_TLS_CLIENT_CA_FILE"]["value"], "callers are authenticated (mTLS)"
    assert int(env["BROKER_SESSION_DURATION"]["value"]) <= 3600, "role chaining caps at 1 h"


def test_the_shutdown_fits_in_the_termination_grace_period() -> None:
    """On deletion the kubelet runs preStop, then sends SIGTERM: health NOT_SERVING, every call
    served for BROKER_DRAIN_SECONDS, then calls in flight get BROKER_SHUTDOWN_GRACE, then the
    broker closes. SIGKILL comes terminationGracePeriodSeconds after the deletion, preStop
    included: all of it must fit, with room to close the store and the AWS client."""
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}

    def setting(name: str) -> float:
        value = env.get(f"BROKER_{name.upper()}")
        return float(value if value is not None else Settings.model_fields[name].default)

    drain, grace = setting("drain_seconds"), setting("shutdown_grace")
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]  # no shell needed
    readiness = container["readinessProbe"]
    # NOT_SERVING is seen by the readiness probe (failureThreshold probes, periodSeconds apart)
    # before the server stops accepting.
    assert drain >= readiness["periodSeconds"] * readiness["failureThreshold"]
    assert pre_stop >= 1, "endpoints drop the pod before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + CLOSE_SECONDS


def test_disruption_budget_keeps_replicas_serving() -> None:
    budget = kind("PodDisruptionBudget")["spec"]
    assert 1 <= budget["minAvailable"] < kind("Deployment")["spec"]["replicas"]


def test_service_account_carries_the_aws_role() -> None:
    annotations = kind("ServiceAccount")["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", annotations["eks.amazonaws.com/role-arn"])


def test_network_policy_limits_who_reaches_the_grpc_port() -> None:
    policy = kind("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    grpc_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 50051)
    assert grpc_rule["from"], "not open to every pod"


def test_dockerfile_passes_hadolint_and_names_real_settings() -> None:
    dockerfile = ROOT / "deploy" / "Dockerfile"
    checked = subprocess.run(
        [str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = dockerfile.read_text()
    assert re.search(r"^USER \d+", text, re.M), "runs as non-root"
    assert set(re.findall(r"\b(BROKER_[A-Z_]+)=", text)) <= SETTINGS
