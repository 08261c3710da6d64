"""Settings are validated at start-up with a message that names the variable and the fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from broker.auth import CONNECTION_RPCS, CREDENTIAL_RPCS, Rule, hash_token
from broker.config import (
    BOTOCORE_ADVISORY_REFRESH,
    BOTOCORE_MANDATORY_REFRESH,
    MAX_SESSION_DURATION,
    MIN_SESSION_DURATION,
    ConfigError,
    load_settings,
)
from broker.template import template_body

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
                "policy": "token:a=all",
            },
            "in plaintext",
        ),
        ({"token_hashes": f"launcher={TOKEN}"}, "only the hash"),
        ({"token_hashes": f"launcher={hash_token(TOKEN)}"}, "no policy"),
        ({"policy": "token:x=credentials"}, "no caller authentication"),
        ({"token_hashes": f"a={hash_token(TOKEN)}", "policy": "token:a=IssueCreds"}, "unknown RPC"),
        ({"listen": "127.0.0.1"}, "is not host:port"),
        ({"session_duration": 3601}, "3601 s is longer than 3600 s, the MaxSessionDuration"),
        ({"session_duration": 43200}, "43200 s is longer than 3600 s, the MaxSessionDuration"),
        ({"session_duration": 899}, "greater than or equal to 900"),
        ({"session_duration": 900, "refresh_margin": 1200}, "must be less than BROKER_SESSION"),
        ({"refresh_margin": 3600}, "must be less than BROKER_SESSION_DURATION"),
        ({"session_policy_arns": "ReadOnlyAccess"}, "not a managed policy ARN"),
        ({"database_url": "mysql://x"}, "sqlite:///"),
        ({"log_level": "LOUD"}, "DEBUG, INFO"),
        ({"tls_cert_file": "/nonexistent.pem"}, "BROKER_TLS_CERT_FILE"),
        ({"event_loop": "tokio"}, "'uvloop' or 'asyncio'"),
        ({"rpc_log": "some"}, "'all' or 'errors'"),
        ({"max_pending_seconds": 0}, "BROKER_MAX_PENDING_SECONDS"),
        ({"max_pending_seconds": 3601}, "BROKER_MAX_PENDING_SECONDS"),
        ({"max_pending_seconds": "1.5"}, "BROKER_MAX_PENDING_SECONDS"),
    ],
)
def test_wrong_settings_are_refused_with_the_fix(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**overrides)
    assert message in str(refused.value)


def test_mtls_without_server_certificate_is_refused(pem: str) -> None:
    with pytest.raises(ConfigError, match="needs BROKER_TLS_CERT/KEY_FILE"):
        load_settings(tls_client_ca_file=pem, policy="dns:x.internal=all")


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


# The policy and the token names, each refusal a row. Every identity kind is configured (mTLS
# and the tokens launcher and ui) unless a row says otherwise, so that each row fails for its
# own reason only; the message must name the variable to fix.
OTHER_TOKEN = "another-token-0123456789abcdef-0123456789"
TOKENS = f"launcher={hash_token(TOKEN)},ui={hash_token(OTHER_TOKEN)}"
WRONG_POLICIES = [
    ("token:launcher=credentials@", "an empty tenant list"),
    ("token:launcher=credentials@|", "an empty tenant list"),
    ("token:launcher=credentials@ ", "an empty tenant list"),
    ("token:launcher=credentials@acme|", "an empty tenant list"),
    ("token:launcher=credentials@*", "omit @… (or tenants) for every tenant"),
    ("token:launcher=credentials@acme corp", "must be 1-64 characters"),
    ("token:launcher=credentials; token:launcher=connections", "has a second entry"),
    (" token:launcher=credentials; TOKEN:launcher =connections", "has a second entry"),
    ("dns:ops.internal=GetConnection; dns:OPS.Internal=all", "has a second entry"),
    ("token:launcher=IssueCreds", "unknown RPC or group"),
    ("token:launcher=credential", "unknown RPC or group"),
    ("token:launcher=", "no RPCs"),
    ("token:launcher=@acme", "no RPCs"),
    ("token:launcher=credentials,,connections", "an empty RPC name"),
    ("", "no rules"),
    (" ; ; ", "no rules"),
    ("launcher=credentials", "no scheme: write token:launcher"),
    ("launcher=credentials", "dns:launcher"),
    ("=credentials", "names no identity"),
    ("token:launcher=credentials=all", "is not identity=rpcs"),
    ("token:=credentials", "is not token:<name"),
    ("token:laun cher=credentials", "is not token:<name"),
    ("dns:*.internal=GetConnection", "is not dns:<host name>"),
    ("dns:spiffe://example.org/x=GetConnection", "is not dns:<host name>"),
    ("spiffe://example.org=credentials", "is not a SPIFFE ID"),
    ("spiffe://Example.org/launcher=credentials", "is not a SPIFFE ID"),
    ("spiffe://example.org/../launcher=credentials", "is not a SPIFFE ID"),
    ("https://example.org/launcher=credentials", "unknown scheme 'https'"),
    ("token:nobody=credentials", "BROKER_TOKEN_HASHES has no nobody=sha256"),
]


@pytest.mark.parametrize(("policy", "message"), WRONG_POLICIES)
def test_a_doubtful_policy_stops_start_up(pem: str, policy: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(
            tls_cert_file=pem,
            tls_key_file=pem,
            tls_client_ca_file=pem,
            token_hashes=TOKENS,
            policy=policy,
        )
    assert "BROKER_POLICY" in str(refused.value)
    assert message in str(refused.value)


CALLER = '[[caller]]\nidentity = "token:launcher"\n'
WRONG_POLICY_FILES = [
    (CALLER + 'rpcs = ["credentials"]\ntenants = "acme"\n', "tenants must be a list of strings"),
    (CALLER + 'rpcs = ["credentials"]\ntenants = [1]\n', "tenants must be a list of strings"),
    (CALLER + 'rpcs = "credentials"\n', "rpcs must be a list of strings"),
    (CALLER, "rpcs must be a list of strings"),
    (CALLER + "rpcs = []\n", "no RPCs"),
    (CALLER + 'rpcs = ["credentials"]\ntenants = []\n', "an empty tenant list"),
    (CALLER + 'rpcs = ["credentials"]\ntenants = [""]\n', "an empty tenant list"),
    (CALLER + 'rpcs = ["credentials"]\ntenants = ["*"]\n', "for every tenant"),
    (CALLER + 'rpcs = ["credentials"]\ntenant = ["acme"]\n', "unknown key tenant"),
    ('[[caller]]\nidentity = 5\nrpcs = ["credentials"]\n', "identity must be a string"),
    ('[[caller]]\nrpcs = ["credentials"]\n', "identity must be a string"),
    ('[[caller]]\nidentity = "launcher"\nrpcs = ["credentials"]\n', "no scheme"),
    ('[caller]\nidentity = "token:launcher"\nrpcs = ["all"]\n', "an array of tables"),
    ('caller = ["token:launcher"]\n', "an array of tables"),
    ('[[callers]]\nidentity = "token:launcher"\nrpcs = ["all"]\n', "unknown key callers"),
    (CALLER + 'rpcs = ["credentials"]\n' + CALLER + 'rpcs = ["all"]\n', "has a second entry"),
    (CALLER + 'rpcs = ["IssueCreds"]\n', "unknown RPC or group"),
    ("", "no rules"),
    ("[[caller]\n", "not a TOML file"),
    ('[[caller]]\nidentity = "token:nobody"\nrpcs = ["all"]\n', "has no nobody=sha256"),
]


@pytest.mark.parametrize(("text", "message"), WRONG_POLICY_FILES)
def test_a_doubtful_policy_file_stops_start_up(
    pem: str, tmp_path: Path, text: str, message: str
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_settings(
            tls_cert_file=pem,
            tls_key_file=pem,
            tls_client_ca_file=pem,
            token_hashes=TOKENS,
            policy_file=str(policy),
        )
    assert "BROKER_POLICY_FILE" in str(refused.value)
    assert message in str(refused.value)


SAME = hash_token(TOKEN)
WRONG_TOKEN_NAMES = [
    (f"token:launcher={SAME}", "write the bare name (launcher=sha256:…)"),
    (f"launcher={SAME},launcher={hash_token(OTHER_TOKEN)}", "configured twice"),
    (f"launcher={SAME},ui={SAME}", "have the same hash"),
    (f"laun cher={SAME}", "is not a token name"),
    (f"={SAME}", "is not a token name"),
    (f"launcher={TOKEN}", "only the hash"),
    ("launcher", "is not NAME=sha256"),
]


@pytest.mark.parametrize(("token_hashes", "message"), WRONG_TOKEN_NAMES)
def test_doubtful_token_names_stop_start_up(token_hashes: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(token_hashes=token_hashes, policy="token:launcher=credentials")
    assert "BROKER_TOKEN_HASHES" in str(refused.value)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "policy",
    ["spiffe://example.org/ui=connections", "token:launcher=all; dns:ops.internal=GetConnection"],
)
def test_certificate_callers_without_mtls_stop_start_up(pem: str, policy: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(tls_cert_file=pem, tls_key_file=pem, token_hashes=TOKENS, policy=policy)
    assert "BROKER_POLICY names" in str(refused.value)
    assert "mTLS is off: set BROKER_TLS_CLIENT_CA_FILE" in str(refused.value)


def test_two_policies_stop_start_up(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[[caller]]\nidentity = "token:launcher"\nrpcs = ["all"]\n')
    with pytest.raises(ConfigError, match="BROKER_POLICY and BROKER_POLICY_FILE are both set"):
        load_settings(
            token_hashes=TOKENS, policy="token:launcher=all", policy_file=str(policy_file)
        )


def test_policies_name_each_caller_in_its_namespace(pem: str, tmp_path: Path) -> None:
    """The string and the TOML file say the same thing; schemes and DNS names are read in
    lower case, tenants and spaces around the separators as written."""
    text = (
        " TOKEN:launcher = credentials @ acme | globex ; dns:OPS.Internal=GetConnection,VerifyRole;"
        " spiffe://example.org/ns/platform/sa/settings-ui=connections;"
    )
    toml = (
        '[[caller]]\nidentity = "token:launcher"\nrpcs = ["credentials"]\n'
        'tenants = ["acme", "globex"]\n'
        '[[caller]]\nidentity = "dns:ops.internal"\nrpcs = ["GetConnection", "VerifyRole"]\n'
        '[[caller]]\nidentity = "spiffe://example.org/ns/platform/sa/settings-ui"\n'
        'rpcs = ["connections"]\n'
    )
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(toml)
    expected = {
        "token:launcher": Rule(CREDENTIAL_RPCS, frozenset({"acme", "globex"})),
        "dns:ops.internal": Rule(frozenset({"GetConnection", "VerifyRole"})),
        "spiffe://example.org/ns/platform/sa/settings-ui": Rule(CONNECTION_RPCS),
    }
    mtls = {"tls_cert_file": pem, "tls_key_file": pem, "tls_client_ca_file": pem}
    for source in ({"policy": text}, {"policy_file": str(policy_file)}):
        settings = load_settings(token_hashes=TOKENS, **mtls, **source)
        loaded = settings.load_policy()
        assert loaded is not None
        assert loaded.rules == expected, source
        assert loaded.dns_names == {"ops.internal"}


@pytest.mark.parametrize(
    ("overrides", "secret", "named"),
    [
        # A token pasted where its hash belongs.
        ({"token_hashes": f"launcher={TOKEN}"}, TOKEN, "BROKER_TOKEN_HASHES=<not shown>"),
        (
            {"database_url": "host=db user=broker password=hunter2-in-a-dsn dbname=broker"},
            "hunter2-in-a-dsn",
            "BROKER_DATABASE_URL=<not shown>",
        ),
        (
            {"database_url": "mysql://broker:hunter2-database-password@db/broker"},
            "hunter2-database-password",
            "BROKER_DATABASE_URL=<not shown>",
        ),
    ],
)
def test_a_refused_setting_is_named_without_repeating_a_secret(
    overrides: dict[str, Any], secret: str, named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**overrides)
    assert secret not in str(refused.value)
    assert named in str(refused.value)


# Lifetimes. BROKER_REFRESH_MARGIN, unset, follows BROKER_SESSION_DURATION.
LIFETIMES = [(900, 450), (1200, 600), (1800, 600), (2400, 800), (2700, 900), (3600, 1200)]


@pytest.fixture
def no_lifetime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_SESSION_DURATION", raising=False)
    monkeypatch.delenv("BROKER_REFRESH_MARGIN", raising=False)


@pytest.mark.usefixtures("no_lifetime_settings")
@pytest.mark.parametrize(("duration", "margin"), LIFETIMES)
def test_the_refresh_margin_follows_the_session_duration(
    monkeypatch: pytest.MonkeyPatch, duration: int, margin: int
) -> None:
    monkeypatch.setenv("BROKER_SESSION_DURATION", str(duration))
    assert load_settings().refresh_margin == margin
    assert load_settings(session_duration=duration).refresh_margin == margin


@pytest.mark.usefixtures("no_lifetime_settings")
def test_the_documented_minimum_duration_starts_without_a_margin_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_SESSION_DURATION", "900")
    settings = load_settings()
    assert settings.session_duration == 900
    assert settings.refresh_margin == 450
    assert load_settings().refresh_margin < settings.session_duration


@pytest.mark.usefixtures("no_lifetime_settings")
def test_a_margin_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_REFRESH_MARGIN", "100")
    assert load_settings().refresh_margin == 100
    assert load_settings(session_duration=900).refresh_margin == 100
    assert load_settings(refresh_margin=1500).refresh_margin == 1500
    assert load_settings().session_duration == 3600
    assert load_settings(session_duration=3600, refresh_margin=None).refresh_margin == 1200


@pytest.mark.usefixtures("no_lifetime_settings")
def test_every_default_margin_keeps_the_rule() -> None:
    """A third, raised to botocore's mandatory window as far as half the duration allows: so
    the margin clears botocore's advisory window wherever a third does, its mandatory window
    wherever half does, and never asks for a renewal before half-life."""
    for duration in range(MIN_SESSION_DURATION, MAX_SESSION_DURATION + 1):
        margin = load_settings(session_duration=duration).refresh_margin
        assert duration // 3 <= margin <= duration // 2, duration
        if duration >= 3 * BOTOCORE_ADVISORY_REFRESH:
            assert margin >= BOTOCORE_ADVISORY_REFRESH, duration
        if duration >= 2 * BOTOCORE_MANDATORY_REFRESH:
            assert margin >= BOTOCORE_MANDATORY_REFRESH, duration
        else:
            assert margin == duration // 2, duration


@pytest.mark.usefixtures("no_lifetime_settings")
@pytest.mark.parametrize("duration", [3601, 7200, 43200])
def test_a_duration_the_customer_role_refuses_stops_start_up_naming_both(
    monkeypatch: pytest.MonkeyPatch, duration: int
) -> None:
    monkeypatch.setenv("BROKER_SESSION_DURATION", str(duration))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    (line,) = str(refused.value).splitlines()[1:]
    assert line.strip().startswith(f"BROKER_SESSION_DURATION='{duration}': {duration} s is longer")
    assert "3600 s, the MaxSessionDuration of the role the customer template creates" in line


def test_the_cap_is_the_templates_max_session_duration() -> None:
    template = template_body("arn:aws:iam::123456789012:role/credential-broker")
    (declared,) = re.findall(r"^ +MaxSessionDuration: (\d+)$", template, re.M)
    assert int(declared) == MAX_SESSION_DURATION
    assert load_settings(session_duration=MAX_SESSION_DURATION).session_duration == 3600


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://broker:pw-in-a-bad-url@db:99999999/broker",
        "postgresql://broker:pw-in-a-bad-url@[db/broker",
    ],
)
async def test_a_database_url_that_cannot_be_parsed_stops_start_up_in_one_line(url: str) -> None:
    from broker import server

    settings = load_settings(
        database_url=url,
        template_url="https://t.example/t.yaml",
        trusted_principal_arn="arn:aws:iam::111111111111:role/broker",
        aws_endpoint_url="http://127.0.0.1:9",  # never reached: nothing is asked of AWS first
        listen="127.0.0.1:0",
        metrics_listen="off",
    )
    with pytest.raises(ConfigError) as refused:
        await server.start(settings, static_credentials=("AKIA0", "secret"))
    assert "BROKER_DATABASE_URL" in str(refused.value)
    assert "pw-in-a-bad-url" not in str(refused.value)
