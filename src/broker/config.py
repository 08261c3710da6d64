"""Settings: one frozen, validated object built from the `BROKER_*` environment at start-up.

No other module reads the environment; constructors take the pieces of `Settings` they need.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///./broker.db"
DEFAULT_REGION = "us-east-1"
DEFAULT_SESSION_DURATION = 3600
MIN_SESSION_DURATION = 900
MAX_SESSION_DURATION = 43200
DEFAULT_REFRESH_MARGIN = 1200
DEFAULT_CACHE_MAX_ENTRIES = 100_000
DEFAULT_VERIFY_WAIT = 30.0
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_MAX_PENDING_REQUESTS = 20_000


class Settings(BaseSettings):
    """Everything the broker can be told. Field descriptions are shown by `broker serve --help`."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", frozen=True, extra="ignore")

    listen: str = Field(
        DEFAULT_LISTEN,
        description="host:port the gRPC server listens on. Only loopback until caller "
        "authentication is configured.",
    )
    database_url: str = Field(
        DEFAULT_DATABASE_URL, description="Where connections are stored (never credentials)."
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
    aws_endpoint_url: str | None = Field(
        None, description="Points STS and IAM at an emulator (e.g. http://127.0.0.1:5000)."
    )
    session_duration: int = Field(
        DEFAULT_SESSION_DURATION,
        ge=MIN_SESSION_DURATION,
        le=MAX_SESSION_DURATION,
        description="Seconds each issued credential lives (900-43200; never past the role's "
        "maximum, and 3600 at most when the broker itself runs on an assumed role).",
    )
    refresh_margin: int = Field(
        DEFAULT_REFRESH_MARGIN,
        ge=60,
        description="Seconds before expiry at which cached credentials are renewed.",
    )
    cache_max_entries: int = Field(
        DEFAULT_CACHE_MAX_ENTRIES, ge=1, description="Most runs held in the credential cache."
    )
    session_policy_arns: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated managed policy ARNs applied to every session. Default: "
        "arn:<partition>:iam::aws:policy/ReadOnlyAccess.",
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
    max_pending_requests: int = Field(
        DEFAULT_MAX_PENDING_REQUESTS,
        ge=1,
        description="Calls gRPC core queues before the server takes them (reconnect storms).",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, port = split_host_port(value)
        if not is_loopback(host):
            raise ValueError(
                f"{host} is not a loopback address: caller authentication is not configured, "
                "so the broker listens on loopback only (e.g. 127.0.0.1:50051)"
            )
        del port
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith("sqlite:///"):
            raise ValueError("must be sqlite:///PATH (PostgreSQL is not supported yet)")
        return value

    @field_validator("template_url", "aws_endpoint_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
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

    @model_validator(mode="after")
    def _check_margin(self) -> Settings:
        if self.refresh_margin >= self.session_duration:
            raise ValueError(
                f"BROKER_REFRESH_MARGIN ({self.refresh_margin}) must be less than "
                f"BROKER_SESSION_DURATION ({self.session_duration})"
            )
        return self


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
                lines.append(f"{name}={error.get('input')!r}: {message}")
            else:
                lines.append(message)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def describe_settings() -> str:
    """One line per variable, for `broker serve --help`."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default in (None, ()) else f" [default: {default}]"
        lines.append(f"  BROKER_{name.upper()}{shown}\n      {field.description}")
    return "\n".join(lines)
