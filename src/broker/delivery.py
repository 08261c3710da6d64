"""One run's credentials, in every form a sandbox takes them: environment variables,
`credential_process` output, and the container-credentials (ECS/EKS) answer; and the two forms
variables are handed to a launcher in (`shell_assignments`, `json_line`)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from broker.v1 import broker_pb2 as pb


@dataclass(frozen=True)
class RunCredentials:
    """Temporary credentials for one run, as the broker issued them. `repr` hides the secrets."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    region: str
    assumed_role_arn: str

    @classmethod
    def from_pb(cls, message: pb.Credentials) -> RunCredentials:
        return cls(
            access_key_id=message.access_key_id,
            secret_access_key=message.secret_access_key,
            session_token=message.session_token,
            expiration=message.expiration.ToDatetime(tzinfo=UTC),
            region=message.region,
            assumed_role_arn=message.assumed_role_arn,
        )

    def env(self) -> dict[str, str]:
        """For a process started with them. They cannot be renewed in place: prefer the
        container-credentials endpoint for runs that may outlive them."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def credential_process(self) -> str:
        """What a `credential_process` command prints (Version 1, with Expiration)."""
        return json.dumps(
            {
                "Version": 1,
                "AccessKeyId": self.access_key_id,
                "SecretAccessKey": self.secret_access_key,
                "SessionToken": self.session_token,
                "Expiration": _iso(self.expiration),
            }
        )

    def container_credentials(self) -> dict[str, str]:
        """The body of an answer on AWS_CONTAINER_CREDENTIALS_FULL_URI."""
        return {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": _iso(self.expiration),
            "RoleArn": self.assumed_role_arn,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shell_assignments(variables: Mapping[str, str]) -> str:
    """KEY=value lines, each value shell-quoted where it needs to be: a POSIX shell can `eval`
    them (with `set -a` to export them). A launcher that parses rather than evals reads
    `json_line` instead."""
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in variables.items())


def json_line(variables: Mapping[str, str]) -> str:
    """One JSON object on one line."""
    return json.dumps(dict(variables), separators=(",", ":")) + "\n"
