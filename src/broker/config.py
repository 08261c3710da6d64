"""Settings: one frozen, validated object built from the `BROKER_*` environment at start-up.

No other module reads the environment; constructors take the pieces of `Settings` they need.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, FilePath, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.auth import Policy, parse_token_hashes
from broker.template import ROLE_MAX_SESSION_DURATION

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///./broker.db"
DEFAULT_REGION = "us-east-1"
DEFAULT_SESSION_DURATION = 3600
MIN_SESSION_DURATION = 900  # AWS's minimum
# The customer's role refuses longer sessions (and role chaining caps a broker that runs on an
# assumed role, as on EKS, at 3600 too).
MAX_SESSION_DURATION = ROLE_MAX_SESSION_DURATION
DEFAULT_REFRESH_MARGIN = 1200  # for the default duration: see `default_refresh_margin`
# botocore's refresh windows: an SDK holding credentials with less than 15 min left tries to
# refresh them before each call (advisory), and with less than 10 min left waits for new ones
# before each call (mandatory).
BOTOCORE_ADVISORY_REFRESH = 900
BOTOCORE_MANDATORY_REFRESH = 600
DEFAULT_CACHE_MAX_ENTRIES = 100_000
DEFAULT_VERIFY_WAIT = 30.0
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_MAX_PENDING_REQUESTS = 20_000
DEFAULT_MAX_PENDING_SECONDS = 120
DEFAULT_MAX_CALL_SECONDS = 60.0
DEFAULT_RECHECK_INTERVAL = 30.0
DEFAULT_REVERIFY_INTERVAL = 300.0
DEFAULT_GRANT_MAX_STALENESS = 30.0
DEFAULT_STORE_READ_TIMEOUT = 0.2
DEFAULT_DRAIN_SECONDS = 15.0
DEFAULT_STS_MAX_CONCURRENCY = 32
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_STS_REGION_COOLDOWN = 30.0
DEFAULT_TENANT_STS_RATE = 20.0
DEFAULT_TENANT_STS_BURST = 500
DEFAULT_TENANT_MAX_STREAMS = 10_000
DEFAULT_CALLER_MAX_STREAMS = 20_000
DEFAULT_TENANT_VERIFY_CONCURRENCY = 2
DEFAULT_CALLER_TENANT_RATE = 1.0
DEFAULT_CALLER_TENANT_BURST = 100
DEFAULT_TENANT_MAX_EVENTS = 1000
# An AWS region name: us-east-1, eu-central-2, us-gov-west-1, cn-northwest-1, ap-southeast-5.
REGION_NAME = re.compile(r"[a-z]{2}(-[a-z]+)+-[1-9][0-9]?", re.ASCII)


class Settings(BaseSettings):
    """Everything the broker can be told. Field descriptions are shown by `broker serve --help`."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", frozen=True, extra="ignore")

    listen: str = Field(
        DEFAULT_LISTEN,
        description="host:port the gRPC server listens on. Any address but loopback needs "
        "caller authentication (mTLS or tokens).",
    )
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="Where connections are stored (never credentials): sqlite:///PATH for one "
        "replica, postgresql://… for several.",
    )
    recheck_interval: float = Field(
        DEFAULT_RECHECK_INTERVAL,
        gt=0,
        description="Seconds between re-checks of every tenant held, in case a change "
        "notification from another replica was lost.",
    )
    reverify_interval: float = Field(
        DEFAULT_REVERIFY_INTERVAL,
        gt=0,
        description="Seconds between runs of VerifyRole's checks (3 AssumeRole calls and an "
        "IAM read each) on the role of every tenant held: one that no longer passes (say, its "
        "trust policy was loosened) is SUSPENDED and nothing more is issued for it.",
    )
    trusted_principal_arn: str | None = Field(
        None,
        description="The AWS principal customers' roles trust (ours). Default: the broker's own "
        "identity from sts:GetCallerIdentity.",
    )
    template_url: str | None = Field(
        None,
        description="HTTPS (S3) URL of the customer's CloudFormation template, for the "
        "quick-create link. Required by `broker serve`.",
    )
    aws_region: str = Field(DEFAULT_REGION, description="Region of the STS/IAM endpoints.")
    sts_regions: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated STS regions, in order of preference: AssumeRole goes to "
        "the first whose endpoint is healthy, and a call that fails transiently there "
        "(unreachable, timeout, 5xx, throttled after retries) moves on to the next. Sessions "
        "from any regional endpoint are valid in every region. Default: BROKER_AWS_REGION "
        "alone.",
    )
    sts_endpoint_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated REGION=URL: the STS endpoint of a region in "
        "BROKER_STS_REGIONS, for VPC interface endpoints or an emulator. Default: AWS's regional "
        "endpoint (or BROKER_AWS_ENDPOINT_URL).",
    )
    sts_region_cooldown: float = Field(
        DEFAULT_STS_REGION_COOLDOWN,
        gt=0,
        le=3600,
        description="Seconds a region whose STS failed transiently is skipped (a circuit "
        "breaker) before one call tries it again. Calls go to it anyway when every region "
        "is cooling down.",
    )
    aws_endpoint_url: str | None = Field(
        None, description="Points STS and IAM at an emulator (e.g. http://127.0.0.1:5000)."
    )
    session_duration: int = Field(
        DEFAULT_SESSION_DURATION,
        ge=MIN_SESSION_DURATION,
        description=f"Seconds each issued credential lives ({MIN_SESSION_DURATION}-"
        f"{MAX_SESSION_DURATION}: the customer template's MaxSessionDuration is "
        f"{ROLE_MAX_SESSION_DURATION}, and role chaining caps a broker on an assumed role at "
        "3600 too).",
    )
    refresh_margin: int = Field(
        DEFAULT_REFRESH_MARGIN,
        ge=60,
        description="Seconds before expiry at which cached credentials are renewed (at most "
        "half their lifetime is used). Unset: a third of BROKER_SESSION_DURATION (1200 for "
        "3600), raised to botocore's mandatory refresh window (600) as far as half the "
        "duration allows (450 for 900); docs/deploy.md says why.",
    )
    refresh_mandatory: int = Field(
        BOTOCORE_MANDATORY_REFRESH,  # for the default margin; _scale_margin sets it
        ge=30,
        description="Seconds before expiry inside which a call waits for renewed credentials. "
        "Between BROKER_REFRESH_MARGIN and this, the first call starts one renewal in the "
        "background and every call is answered from the cache at once (botocore's advisory "
        "and mandatory windows). Unset: botocore's 600, at most half the margin (at most a "
        "quarter of a lifetime is used).",
    )
    cache_max_entries: int = Field(
        DEFAULT_CACHE_MAX_ENTRIES, ge=1, description="Most runs held in the credential cache."
    )
    session_policy_arns: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated managed policy ARNs applied to every session. Default: "
        "arn:<partition>:iam::aws:policy/ReadOnlyAccess.",
    )
    sts_max_concurrency: int = Field(
        DEFAULT_STS_MAX_CONCURRENCY,
        ge=1,
        le=1000,
        description="Most sts:AssumeRole calls in flight at once (bursts of new runs, renewals "
        "resuming after an outage).",
    )
    tenant_sts_rate: float = Field(
        DEFAULT_TENANT_STS_RATE,
        ge=0.001,
        le=1e6,
        allow_inf_nan=False,
        description="New STS sessions (first credentials of a run) per second per tenant, "
        "refilling a bucket of BROKER_TENANT_STS_BURST; past it, RESOURCE_EXHAUSTED with a "
        "RetryInfo. Renewals and cached answers never count.",
    )
    tenant_sts_burst: int = Field(
        DEFAULT_TENANT_STS_BURST,
        ge=1,
        description="New STS sessions a tenant may start at once before "
        "BROKER_TENANT_STS_RATE paces it.",
    )
    tenant_sts_concurrency: int = Field(
        DEFAULT_STS_MAX_CONCURRENCY // 4,  # for the default bound; _scale_margin sets it
        ge=1,
        description="Most sts:AssumeRole calls of one tenant in flight at once, a share of "
        "BROKER_STS_MAX_CONCURRENCY so one tenant cannot hold every slot (more wait). Unset: "
        "a quarter of it, at least 1.",
    )
    tenant_max_streams: int = Field(
        DEFAULT_TENANT_MAX_STREAMS,
        ge=1,
        description="Most open WatchCredentials streams per tenant (on this replica).",
    )
    caller_max_streams: int = Field(
        DEFAULT_CALLER_MAX_STREAMS,
        ge=1,
        description="Most open WatchCredentials streams per caller (on this replica); the "
        "policy file may set another for a caller (max_streams).",
    )
    tenant_verify_concurrency: int = Field(
        DEFAULT_TENANT_VERIFY_CONCURRENCY,
        ge=1,
        description="Most VerifyRole calls in flight per tenant (each makes up to 3 AssumeRole "
        "calls and an IAM read, retried for BROKER_VERIFY_WAIT).",
    )
    caller_tenant_rate: float = Field(
        DEFAULT_CALLER_TENANT_RATE,
        ge=0.001,
        le=1e6,
        allow_inf_nan=False,
        description="Tenants one caller may create per second (CreateConnection for a new "
        "tenant), refilling a bucket of BROKER_CALLER_TENANT_BURST, on this replica; the "
        "policy file may set others for a caller (tenant_rate, tenant_burst).",
    )
    caller_tenant_burst: int = Field(
        DEFAULT_CALLER_TENANT_BURST,
        ge=1,
        description="Tenants one caller may create at once before BROKER_CALLER_TENANT_RATE "
        "paces it.",
    )
    tenant_max_events: int = Field(
        DEFAULT_TENANT_MAX_EVENTS,
        ge=10,
        description="Event rows kept per tenant. A repeat of the tenant's newest event is "
        "folded into it, with a count; past this bound the oldest rows go, link_changed before "
        "audit events, never the newest event of each kind (docs/deploy.md, event retention).",
    )
    verify_wait: float = Field(
        DEFAULT_VERIFY_WAIT,
        ge=0,
        le=120,
        description="Seconds VerifyRole keeps retrying a role that AWS does not accept yet "
        "(IAM is eventually consistent).",
    )
    shutdown_grace: float = Field(
        DEFAULT_SHUTDOWN_GRACE,
        ge=0,
        description="Seconds in-flight calls get to finish on SIGTERM before they are cancelled.",
    )
    drain_seconds: float = Field(
        DEFAULT_DRAIN_SECONDS,
        ge=0,
        le=300,
        description="Seconds the server keeps serving every call on SIGTERM after health turns "
        "NOT_SERVING, before it stops accepting, so readiness probes and load balancers move "
        "callers away first: deploy/k8s's readiness probe (every 5 s, 2 failures) notices "
        "within 10 s, and the endpoint change then takes a moment to reach every node. A "
        "second signal ends the drain early. `broker dev` uses 0 unless this is set.",
    )
    grant_max_staleness: float = Field(
        DEFAULT_GRANT_MAX_STALENESS,
        gt=0,
        le=3600,
        description="A replica mints a new STS session for a tenant only while the store "
        "confirmed the tenant's ACTIVE connection within this many seconds (a read, or an "
        "unbroken change-notification channel); past it, UNAVAILABLE. Credentials already "
        "issued to a run are served until their refresh point.",
    )
    store_read_timeout: float = Field(
        DEFAULT_STORE_READ_TIMEOUT,
        gt=0,
        le=10,
        description="Longest a call waits for the store to read a tenant's connection before "
        "it falls back to the one last read (within BROKER_GRANT_MAX_STALENESS).",
    )
    max_pending_requests: int = Field(
        DEFAULT_MAX_PENDING_REQUESTS,
        ge=1,
        description="Calls gRPC core queues before the server takes them (reconnect storms).",
    )
    max_pending_seconds: int = Field(
        DEFAULT_MAX_PENDING_SECONDS,
        ge=1,
        le=3600,
        description="Longest gRPC core keeps a call queued before the server takes it; past "
        "it the call ends CANCELLED. Under a reconnect storm the server takes a few hundred "
        "calls a second (gRPC core's own default, 30 s, cancelled 7% of 10,000 streams "
        "opened at once).",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    tls_cert_file: FilePath | None = Field(
        None, description="The server's TLS certificate chain (PEM). With TLS_KEY_FILE: TLS on."
    )
    tls_key_file: FilePath | None = Field(None, description="The server's TLS private key (PEM).")
    tls_client_ca_file: FilePath | None = Field(
        None,
        description="CA bundle (PEM) for client certificates: mTLS, every caller must present "
        "one. A certificate is the caller spiffe://… (its one URI SAN), else dns:NAME for a "
        "DNS SAN the policy names so; several URI SANs are refused.",
    )
    token_hashes: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Bearer tokens, as comma-separated NAME=sha256:<hex> (only hashes; `broker "
        "token NAME` makes a token and its hash); the policy calls each token:NAME. Needs TLS "
        "off loopback.",
    )
    policy: str | None = Field(
        None,
        description="Who may call what: 'IDENTITY=connections|credentials|all|<RPC>[,…]"
        "[@tenant|…]; …', IDENTITY being spiffe://…, dns:NAME or token:NAME. Required with "
        "authentication; anything doubtful stops start-up.",
    )
    policy_file: FilePath | None = Field(
        None,
        description="The policy as a TOML file instead: [[caller]] tables of identity = "
        '"…", rpcs = [...] and optionally tenants = [...].',
    )
    metrics_listen: str = Field(
        DEFAULT_METRICS_LISTEN,
        description="host:port of the Prometheus metrics endpoint (/metrics), or 'off'.",
    )
    log_format: str = Field("json", description="json (one object per line) or text.")
    health_listen: str | None = Field(
        None,
        description="Also serve grpc.health.v1 alone, in plaintext, on this host:port: for "
        "Kubernetes gRPC probes, which cannot present TLS client certificates.",
    )
    rpc_log: Literal["all", "errors"] = Field(
        "all",
        description="Which RPCs get their INFO line: all, or errors (those that did not end "
        "OK; the metrics still count every call). The line is an access record: about 12k "
        "instructions of a cached IssueCredentials on the event loop, some 4 % of a bare "
        "handler's call (docs/performance.md). Audit events are logged either way.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The event loop: uvloop (about 10 % more calls per second than asyncio, "
        "the same p99; docs/benchmarks.md) or asyncio.",
    )
    max_call_seconds: float = Field(
        DEFAULT_MAX_CALL_SECONDS,
        gt=0,
        le=600,
        description="Longest a unary call without a deadline may run (streams are exempt).",
    )

    @field_validator("listen", "health_listen", "metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None and value != "off":
            split_host_port(value)
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("must be json or text")
        return value

    @field_validator("token_hashes", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("token_hashes")
    @classmethod
    def _check_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_token_hashes(value)
        return value

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, value: str | None) -> str | None:
        if value is not None:
            Policy.parse(value)
        return value

    @field_validator("policy_file")
    @classmethod
    def _check_policy_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_policy_file(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
        return value

    @field_validator("template_url", "aws_endpoint_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_url(value)
        return value

    @field_validator("aws_region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not REGION_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a region name (e.g. us-east-1)")
        return value

    @field_validator("session_policy_arns", mode="before")
    @classmethod
    def _split_arns(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("session_policy_arns")
    @classmethod
    def _check_arns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arn in value:
            if not arn.startswith("arn:") or ":policy/" not in arn:
                raise ValueError(f"{arn!r} is not a managed policy ARN")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("session_duration")
    @classmethod
    def _check_duration(cls, value: int) -> int:
        if value > MAX_SESSION_DURATION:
            raise ValueError(
                f"{value} s is longer than {ROLE_MAX_SESSION_DURATION} s, the MaxSessionDuration "
                "of the role the customer template creates: AWS would refuse every AssumeRole "
                "(and role chaining caps a broker on an assumed role at 3600 s)"
            )
        return value

    @field_validator("sts_regions", "sts_endpoint_urls", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):  # empty: unset; an empty item between commas: an error
            return tuple(part.strip() for part in value.split(",")) if value.strip() else ()
        return value

    @field_validator("sts_regions")
    @classmethod
    def _check_regions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for region in value:
            if not REGION_NAME.fullmatch(region):
                raise ValueError(f"{region!r} is not a region name (e.g. us-east-1,us-west-2)")
        if len(set(value)) != len(value):
            raise ValueError("names a region twice")
        return value

    @field_validator("sts_endpoint_urls")
    @classmethod
    def _check_endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_endpoint_urls(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _scale_margin(cls, data: Any) -> Any:
        """Unset: BROKER_REFRESH_MARGIN is `default_refresh_margin` of the duration set,
        BROKER_REFRESH_MANDATORY `default_refresh_mandatory` of the margin, and
        BROKER_TENANT_STS_CONCURRENCY a quarter of BROKER_STS_MAX_CONCURRENCY."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            if data.get("refresh_margin") is None:
                duration = int(data.get("session_duration", DEFAULT_SESSION_DURATION))
                if MIN_SESSION_DURATION <= duration <= MAX_SESSION_DURATION:
                    data["refresh_margin"] = default_refresh_margin(duration)
        except (TypeError, ValueError):
            pass  # the setting's own error says what is wrong with it
        if data.get("refresh_mandatory") is None:
            margin = _int_or(data.get("refresh_margin"), DEFAULT_REFRESH_MARGIN)
            data["refresh_mandatory"] = default_refresh_mandatory(margin)
        if data.get("tenant_sts_concurrency") is None:
            slots = _int_or(data.get("sts_max_concurrency"), DEFAULT_STS_MAX_CONCURRENCY)
            data["tenant_sts_concurrency"] = max(1, slots // 4)
        return data

    @model_validator(mode="after")
    def _check_margin(self) -> Settings:
        if self.refresh_margin >= self.session_duration:
            raise ValueError(
                f"BROKER_REFRESH_MARGIN ({self.refresh_margin}) must be less than "
                f"BROKER_SESSION_DURATION ({self.session_duration})"
            )
        if self.refresh_mandatory >= self.refresh_margin:
            raise ValueError(
                f"BROKER_REFRESH_MANDATORY ({self.refresh_mandatory}) must be less than "
                f"BROKER_REFRESH_MARGIN ({self.refresh_margin}): calls wait for renewal only "
                "inside the margin's last stretch"
            )
        if self.tenant_sts_concurrency > self.sts_max_concurrency:
            raise ValueError(
                f"BROKER_TENANT_STS_CONCURRENCY ({self.tenant_sts_concurrency}) must be at most "
                f"BROKER_STS_MAX_CONCURRENCY ({self.sts_max_concurrency})"
            )
        return self

    @model_validator(mode="after")
    def _check_sts_endpoints(self) -> Settings:
        regions = set(self.regions)
        for region in parse_endpoint_urls(self.sts_endpoint_urls):
            if region not in regions:
                raise ValueError(
                    f"BROKER_STS_ENDPOINT_URLS names {region}, which is not in "
                    f"BROKER_STS_REGIONS ({','.join(self.regions)})"
                )
        return self

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        """Secure by default: off loopback, every caller is authenticated, over TLS."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and not self.tls:
            raise ValueError("BROKER_TLS_CLIENT_CA_FILE (mTLS) needs BROKER_TLS_CERT/KEY_FILE")
        host = split_host_port(self.listen)[0]
        if not is_loopback(host):
            if not self.authenticated:
                raise ValueError(
                    f"refusing to listen on {self.listen} without caller authentication: anyone "
                    "who reaches the port could take AWS credentials. Configure mTLS "
                    "(BROKER_TLS_CERT_FILE, BROKER_TLS_KEY_FILE, BROKER_TLS_CLIENT_CA_FILE) or "
                    "bearer tokens (BROKER_TOKEN_HASHES, with TLS), or listen on 127.0.0.1"
                )
            if not self.tls:
                raise ValueError(
                    f"refusing to send bearer tokens and credentials in plaintext on "
                    f"{self.listen}: set BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE"
                )
        if self.authenticated and self.policy is None and self.policy_file is None:
            raise ValueError(
                "caller authentication is configured but no policy says who may call what: set "
                "BROKER_POLICY (e.g. 'spiffe://example.org/ui=connections; "
                "token:launcher=credentials') or BROKER_POLICY_FILE"
            )
        if not self.authenticated and (self.policy is not None or self.policy_file is not None):
            raise ValueError(
                "a policy is configured but no caller authentication: set "
                "BROKER_TLS_CLIENT_CA_FILE or BROKER_TOKEN_HASHES"
            )
        return self

    @model_validator(mode="after")
    def _check_policy_callers(self) -> Settings:
        """Every identity the policy names can authenticate: each token:NAME has a hash in
        BROKER_TOKEN_HASHES, and spiffe:// and dns: identities need mTLS."""
        if self.policy is not None and self.policy_file is not None:
            raise ValueError("BROKER_POLICY and BROKER_POLICY_FILE are both set: keep one")
        policy = self.load_policy()
        if policy is None:
            return self
        variable = "BROKER_POLICY_FILE" if self.policy_file is not None else "BROKER_POLICY"
        tokens = parse_token_hashes(self.token_hashes)
        missing = [
            name
            for name in sorted(policy.rules)
            if name.startswith("token:") and name.removeprefix("token:") not in tokens
        ]
        if missing:
            first = missing[0].removeprefix("token:")
            raise ValueError(
                f"{variable} names {', '.join(missing)}, but BROKER_TOKEN_HASHES has no "
                f"{first}=sha256:… (`broker token {first}` makes a token and that entry)"
            )
        certified = [name for name in sorted(policy.rules) if not name.startswith("token:")]
        if certified and self.tls_client_ca_file is None:
            raise ValueError(
                f"{variable} names {', '.join(certified)}, callers with client certificates, "
                "but mTLS is off: set BROKER_TLS_CLIENT_CA_FILE, or name token:NAME callers only"
            )
        return self

    @property
    def regions(self) -> tuple[str, ...]:
        """The STS regions in order of preference (BROKER_STS_REGIONS, else the one region)."""
        return self.sts_regions or (self.aws_region,)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def authenticated(self) -> bool:
        return self.tls_client_ca_file is not None or bool(self.token_hashes)

    def load_policy(self) -> Policy | None:
        if self.policy_file is not None:
            return _read_policy_file(self.policy_file)
        return Policy.parse(self.policy) if self.policy is not None else None


def _read_policy_file(path: Path) -> Policy:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the policy file ({exc})") from None
    try:
        return Policy.from_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not a TOML file ({exc})") from None


def default_refresh_margin(session_duration: int) -> int:
    """The refresh margin for `session_duration` when BROKER_REFRESH_MARGIN is unset.

    A third of the duration: 1200 s for 3600 s, more than botocore's advisory window, so an SDK
    handed our credentials at their refresh point finds nothing due. Shorter sessions cannot
    keep that: below 2700 s the last credentials served are inside the advisory window (the SDK
    re-fetches them opportunistically; the sandbox endpoint answers from memory). A third of
    less than 1800 s would fall inside the mandatory window, where an SDK waits for a re-fetch
    before every call (and runs a credential_process again each time): there the margin is
    raised to 600 s, or to half the duration if that is less (the cache renews at half-life at
    the latest, `cache.refresh_point`). At 900 s that is 450 s: credentials are born inside the
    advisory window, and half-life renewal keeps the mandatory stretch shortest (150 s of
    every 450 s), for one STS call per run every 7.5 minutes."""
    third = session_duration // 3
    return max(third, min(BOTOCORE_MANDATORY_REFRESH, session_duration // 2))


def _int_or(value: object, default: int) -> int:
    """`value` as an int, or `default` where it is unset or not one (its own error says so)."""
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return default


def default_refresh_mandatory(refresh_margin: int) -> int:
    """BROKER_REFRESH_MANDATORY when unset: botocore's mandatory window (600 s), at most half
    the margin (300 s for a 600 s margin, 225 s for 450 s at the 900 s minimum duration). As
    the margin keeps at most half a lifetime (`cache.refresh_point`), the mandatory window
    keeps at most half of that."""
    return min(BOTOCORE_MANDATORY_REFRESH, refresh_margin // 2)


def check_url(url: str) -> None:
    """An https:// URL, or http:// to loopback (an emulator): signed AWS requests, and the
    credentials STS answers with, never cross a network in the clear."""
    split = urlsplit(url)
    if split.scheme not in ("https", "http") or not split.hostname:
        raise ValueError("must be an https:// URL (http:// to loopback only)")
    if split.scheme == "http" and not is_loopback(split.hostname):
        raise ValueError(
            f"http:// to {split.hostname} would send signed requests and credentials in the "
            "clear: use https:// (http:// is for an emulator on loopback)"
        )


def parse_endpoint_urls(items: tuple[str, ...]) -> dict[str, str]:
    """REGION=URL items → {region: url}; a wrong item raises ValueError naming it."""
    endpoints: dict[str, str] = {}
    for item in items:
        region, sep, url = item.partition("=")
        if not sep or not REGION_NAME.fullmatch(region.strip()):
            raise ValueError(f"{item!r} is not REGION=URL (e.g. us-west-2=https://…)")
        try:
            check_url(url.strip())
        except ValueError as exc:
            raise ValueError(f"{region.strip()}: {exc}") from None
        if region.strip() in endpoints:
            raise ValueError(f"names {region.strip()} twice")
        endpoints[region.strip()] = url.strip()
    return endpoints


def split_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port`; raise ValueError with the expected form."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """The environment holds a wrong value; the message names the variable and the fix."""


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and overrides); errors become one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = "BROKER_" + "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                lines.append(f"{name}={_shown(error['loc'][0], error.get('input'))}: {message}")
            else:
                lines.append(message)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


# Settings whose value may hold a secret by mistake (a token pasted where its hash belongs) or
# by design (a database password, in any of the forms a URL or a DSN takes): an error names
# them without repeating the value.
_NOT_REPEATED = frozenset({"token_hashes", "database_url"})


def _shown(setting: object, value: object) -> str:
    return "<not shown>" if setting in _NOT_REPEATED else repr(value)


def describe_settings() -> str:
    """One line per variable, for `broker serve --help`."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default in (None, ()) else f" [default: {default}]"
        lines.append(f"  BROKER_{name.upper()}{shown}\n      {field.description}")
    return "\n".join(lines)
