"""The deployment, checked offline: Kubernetes manifests against the API schemas (strict), the
choices that keep the broker available and locked down, and the Dockerfile under hadolint."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from broker.config import Settings
from tests.processes import BIN, BrokerProcess

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


def test_the_pod_has_no_api_token_and_runs_restricted() -> None:
    """The broker never calls the Kubernetes API (IRSA and Pod Identity project their own
    tokens): no API token is mounted. Its namespace enforces the restricted profile."""
    deployment = kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert kind("ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    namespace = kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for document in documents():
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace["metadata"]["name"]


def egress_allows(address: str, port: int, protocol: str = "TCP") -> bool:
    """Whether the NetworkPolicy's egress rules let the broker reach address:port."""
    for rule in kind("NetworkPolicy")["spec"]["egress"]:
        ports = rule.get("ports")
        if ports and not any(
            p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports
        ):
            continue
        peers = rule.get("to")
        if not peers:
            return True  # to any address
        for peer in peers:
            block = peer.get("ipBlock")
            if block is None:
                continue
            ip = ipaddress.ip_address(address)
            network = ipaddress.ip_network(block["cidr"])
            excepted = any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
            if ip.version == network.version and ip in network and not excepted:
                return True
    return False


def test_network_policy_lets_the_broker_reach_what_it_needs_and_no_more() -> None:
    """docs/deploy.md recommends EKS Pod Identity (its agent: 169.254.170.23, fd00:ec2::23 on
    port 80) or IRSA (STS over HTTPS); the broker also needs DNS and PostgreSQL."""
    assert egress_allows("169.254.170.23", 80), "the Pod Identity agent (IPv4)"
    assert egress_allows("fd00:ec2::23", 80), "the Pod Identity agent (IPv6)"
    assert egress_allows("52.94.0.10", 443), "STS and IAM (IRSA's AssumeRoleWithWebIdentity)"
    assert egress_allows("10.20.30.40", 5432), "PostgreSQL"
    dns = [
        rule
        for rule in kind("NetworkPolicy")["spec"]["egress"]
        if any(
            peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
            for peer in rule.get("to", [])
        )
    ]
    assert {(p["port"], p["protocol"]) for rule in dns for p in rule["ports"]} == {
        (53, "UDP"),
        (53, "TCP"),
    }
    assert not egress_allows("169.254.169.254", 80), "not the node's instance metadata"
    assert not egress_allows("169.254.170.24", 80)
    assert not egress_allows("10.20.30.40", 80)
    assert not egress_allows("10.20.30.40", 22)


def test_one_template_url_in_the_docs_and_the_manifests() -> None:
    """The Deployment's BROKER_TEMPLATE_URL is where docs/deploy.md publishes the template."""
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    deployed = {e["name"]: e.get("value") for e in container["env"]}["BROKER_TEMPLATE_URL"]
    guide = (ROOT / "docs" / "deploy.md").read_text()
    (exported,) = re.findall(r"^export BROKER_TEMPLATE_URL=(\S+)$", guide, re.M)
    assert deployed == exported
    ((bucket, key),) = re.findall(r"aws s3 cp customer-role\.yaml s3://([^/\s]+)/(\S+)", guide)
    assert deployed == f"https://{bucket}.s3.amazonaws.com/{key}"
    readable = re.findall(r"arn:aws:s3:::([^\s]+)/\*", guide)
    assert readable == [f"{bucket}/{key.rpartition('/')[0]}"], "the bucket policy's prefix"
    (readme,) = re.findall(
        r"^export BROKER_TEMPLATE_URL=(\S+)$", (ROOT / "README.md").read_text(), re.M
    )
    assert urlsplit(readme).path == urlsplit(deployed).path


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """The patterns of .dockerignore, in order: (exception, regex), as Docker reads them."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def left_out(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` (relative, /-separated) out of the build context: the last
    pattern matching it or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return excluded


def test_the_build_context_is_what_the_dockerfile_copies_and_nothing_else() -> None:
    rules = dockerignore()
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    sources = [
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for source in line.split()[:-1]
    ]
    assert {"pyproject.toml", "constraints.txt", "src", "deploy/cloudformation"} <= set(sources)
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            cached = (
                "__pycache__" in relative or relative.endswith(".pyc") or ".egg-info" in relative
            )
            if path.is_file():
                assert left_out(relative, rules) is cached, relative
    for unwanted in (
        ".venv/bin/python",
        "node_modules/.bin/buf",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".pytest_cache/v/cache/lastfailed",
        ".hypothesis/examples/x",
        "src/broker/__pycache__/cli.cpython-311.pyc",
        "src/credential_broker.egg-info/PKG-INFO",
        "broker.db",
        "src/broker.db-wal",
        "tests/test_deploy.py",
        "bench/__main__.py",
        "docs/deploy.md",
        "deploy/k8s/deployment.yaml",
        "bench-results/latest.json",
    ):
        assert left_out(unwanted, rules), unwanted

    # What this working copy would send: a few hundred KB, not .venv's hundreds of MB.
    exceptions = [regex.pattern for exception, regex in rules if exception]
    size = 0
    for folder, subfolders, names in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT).as_posix()
        here = "" if here == "." else here + "/"
        subfolders[:] = [
            name
            for name in subfolders
            if not left_out(here + name, rules)
            or any(p.startswith(re.escape(here + name + "/")) for p in exceptions)
        ]
        size += sum(
            (Path(folder) / name).stat().st_size
            for name in names
            if not left_out(here + name, rules)
        )
    assert size < 5_000_000, size


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_images_healthcheck_asks_the_health_port(tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK command, run as Docker would (exec form), against a real
    broker: healthy while it serves, unhealthy once it has stopped."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    (command,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    argv = json.loads(command)
    assert argv[0] == "python", "the image's PATH starts with its venv"
    argv[0] = sys.executable
    health = f"127.0.0.1:{free_port()}"
    env = os.environ | {
        "BROKER_LISTEN": "127.0.0.1:0",
        "BROKER_HEALTH_LISTEN": health,
        "BROKER_METRICS_LISTEN": "off",
        "BROKER_TEMPLATE_URL": "https://x",
        "BROKER_TRUSTED_PRINCIPAL_ARN": "arn:aws:iam::111111111111:role/broker",
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'health.db'}",
        "BROKER_DRAIN_SECONDS": "0",
    }
    broker = BrokerProcess(["serve"], env, tmp_path / "serve.log")
    try:
        broker.wait_serving()
        deadline = time.monotonic() + 10
        while (
            check := subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
        ).returncode:
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.2)
        assert broker.stop() == 0
        after = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
        assert after.returncode != 0
    finally:
        broker.close()
