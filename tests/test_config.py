"""Settings are validated at start-up with a message that names the variable and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.auth import hash_token
from broker.config import ConfigError, load_settings

TOKEN = "correct-horse-battery-staple-0123456789abcdef"


@pytest.fixture
def pem(tmp_path: Path) -> str:
    path = tmp_path / "any.pem"
    path.write_text("not checked here")
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"listen": "0.0.0.0:50051"}, "without caller authentication"),
        (
            {
                "listen": "10.0.0.5:50051",
                "token_hashes": f"a={hash_token(TOKEN)}",
                "policy": "a=all",
            },
            "in plaintext",
        ),
        ({"token_hashes": f"launcher={TOKEN}"}, "only the hash"),
        ({"token_hashes": f"launcher={hash_token(TOKEN)}"}, "no policy"),
        ({"policy": "x=credentials"}, "no caller authentication"),
        ({"token_hashes": f"a={hash_token(TOKEN)}", "policy": "a=IssueCreds"}, "unknown RPC"),
        ({"listen": "127.0.0.1"}, "is not host:port"),
        ({"session_duration": 43201}, "less than or equal to 43200"),
        ({"refresh_margin": 3600}, "must be less than BROKER_SESSION_DURATION"),
        ({"session_policy_arns": "ReadOnlyAccess"}, "not a managed policy ARN"),
        ({"database_url": "mysql://x"}, "sqlite:///"),
        ({"log_level": "LOUD"}, "DEBUG, INFO"),
        ({"tls_cert_file": "/nonexistent.pem"}, "BROKER_TLS_CERT_FILE"),
        ({"event_loop": "tokio"}, "'uvloop' or 'asyncio'"),
        ({"rpc_log": "some"}, "'all' or 'errors'"),
    ],
)
def test_wrong_settings_are_refused_with_the_fix(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**overrides)
    assert message in str(refused.value)


def test_mtls_without_server_certificate_is_refused(pem: str) -> None:
    with pytest.raises(ConfigError, match="needs BROKER_TLS_CERT/KEY_FILE"):
        load_settings(tls_client_ca_file=pem, policy="x=all")


def test_a_public_address_with_mtls_and_a_policy_is_accepted(pem: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[caller]]\nidentity = "spiffe://example.org/launcher"\nrpcs = ["credentials"]\n'
        'tenants = ["acme"]\n'
    )
    settings = load_settings(
        listen="0.0.0.0:50051",
        tls_cert_file=pem,
        tls_key_file=pem,
        tls_client_ca_file=pem,
        policy_file=str(policy),
    )
    loaded = settings.load_policy()
    assert loaded is not None
    rule = loaded.rules["spiffe://example.org/launcher"]
    assert rule.tenants == frozenset({"acme"})
    assert "IssueCredentials" in rule.rpcs
    assert "Disconnect" not in rule.rpcs
