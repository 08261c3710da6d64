"""The async AWS client (aiobotocore): one long-lived STS client, and the one place where
botocore's errors become domain errors (errors.py), each marked transient or permanent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from broker.errors import BrokerError, RoleNotAssumable, TransientAwsError, Unavailable
from broker.metrics import Metrics
from broker.models import Credentials

if TYPE_CHECKING:
    from types_aiobotocore_sts import STSClient

log = logging.getLogger(__name__)

# Throttling and server-side failures: retry later, keep serving valid credentials meanwhile.
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "IDPCommunicationError",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)
# Our own identity is broken: not the customer's to fix, and not worth retrying at once.
BROKER_IDENTITY_CODES = frozenset(
    {"InvalidClientTokenId", "ExpiredToken", "SignatureDoesNotMatch", "UnrecognizedClientException"}
)

# botocore's standard retry mode: backoff with jitter for throttling and 5xx, a few attempts.
CLIENT_CONFIG = AioConfig(
    retries={"mode": "standard", "total_max_attempts": 3},
    connect_timeout=2,
    read_timeout=5,
    max_pool_connections=64,
)


@dataclass(frozen=True)
class AssumeRoleRequest:
    """Everything one sts:AssumeRole call carries. `external_id` None probes the trust policy."""

    role_arn: str
    session_name: str
    duration: int
    policy_arns: Sequence[str]
    external_id: str | None = None
    source_identity: str | None = None
    tags: Mapping[str, str] | None = None


class AwsClient:
    """STS (and, for VerifyRole, IAM) for the broker. Create once; `close()` at shutdown."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        static_credentials: tuple[str, str] | None = None,
        max_concurrency: int = 32,
        metrics: Metrics | None = None,
    ) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._session = get_session()
        # The regional endpoint: no dependence on us-east-1 for a broker that runs elsewhere.
        self._session.set_config_variable("sts_regional_endpoints", "regional")
        if static_credentials is not None:
            self._session.set_credentials(*static_credentials)
        self._stack = contextlib.AsyncExitStack()
        # At most this many AssumeRole calls at once: a burst of new runs, or renewals resuming
        # after an outage, queues here instead of hammering STS.
        self._sts_slots = asyncio.Semaphore(max_concurrency)
        self._metrics = metrics or Metrics()
        self._sts: STSClient | None = None

    async def start(self) -> None:
        self._sts = await self._stack.enter_async_context(
            self._session.create_client(
                "sts",
                region_name=self._region,
                endpoint_url=self._endpoint_url,
                config=CLIENT_CONFIG,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    @property
    def sts(self) -> STSClient:
        if self._sts is None:
            raise RuntimeError("AwsClient.start() was not called")
        return self._sts

    async def caller_arn(self) -> str:
        """The broker's own principal, as customers' trust policies must name it."""
        with translate_errors("sts:GetCallerIdentity"):
            arn = (await self.sts.get_caller_identity())["Arn"]
        return principal_arn(arn)

    async def assume_role(self, request: AssumeRoleRequest) -> Credentials:
        params: dict[str, Any] = {
            "RoleArn": request.role_arn,
            "RoleSessionName": request.session_name,
            "DurationSeconds": request.duration,
            "PolicyArns": [{"arn": arn} for arn in request.policy_arns],
        }
        if request.external_id is not None:
            params["ExternalId"] = request.external_id
        if request.source_identity is not None:
            params["SourceIdentity"] = request.source_identity
        if request.tags:
            params["Tags"] = [{"Key": k, "Value": v} for k, v in request.tags.items()]
        async with self._sts_slots:
            started, outcome = time.perf_counter(), "abandoned"
            try:
                with translate_errors("sts:AssumeRole", request.role_arn):
                    answer = await self.sts.assume_role(**params)
                outcome = "ok"
            except RoleNotAssumable:
                outcome = "denied"
                raise
            except BrokerError:
                outcome = "transient"
                raise
            finally:
                self._metrics.sts_calls.labels(outcome).inc()
                self._metrics.sts_seconds.observe(time.perf_counter() - started)
        issued = answer["Credentials"]
        return Credentials(
            access_key_id=issued["AccessKeyId"],
            secret_access_key=issued["SecretAccessKey"],
            session_token=issued["SessionToken"],
            expiration=issued["Expiration"],
            assumed_role_arn=answer["AssumedRoleUser"]["Arn"],
            issued_at=datetime.now(UTC),
        )

    async def read_trust_policy(self, credentials: Credentials, role_arn: str) -> dict[str, Any]:
        """The role's trust policy, read with the role's own (read-only) credentials.

        Raises RoleNotAssumable when the role may not read itself (iam:GetRole denied)."""
        async with self._session.create_client(
            "iam",
            region_name=self._region,
            endpoint_url=self._endpoint_url,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
            config=CLIENT_CONFIG,
        ) as iam:
            with translate_errors("iam:GetRole", role_arn):
                role = await iam.get_role(RoleName=role_arn.rsplit("/", 1)[-1])
        document: Any = role["Role"].get("AssumeRolePolicyDocument", {})
        if isinstance(document, str):
            document = json.loads(unquote(document))
        return dict(document)


@contextlib.contextmanager
def translate_errors(action: str, resource: str = "") -> Any:
    """Turn botocore's errors for `action` into domain errors: the one place that does."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in TRANSIENT_CODES or status >= 500:
            raise TransientAwsError(f"{action} failed transiently ({code}); retry") from exc
        if code in BROKER_IDENTITY_CODES:
            log.error("the broker's own AWS identity was refused", extra={"aws_code": code})
            raise Unavailable(f"{action}: the broker's AWS identity was refused ({code})") from exc
        raise RoleNotAssumable(f"{code}: {message}", subject=resource, code=code) from exc
    except BotoCoreError as exc:
        raise TransientAwsError(
            f"{action}: AWS could not be reached ({type(exc).__name__})"
        ) from exc


def principal_arn(caller_arn: str) -> str:
    """The ARN a trust policy names for a caller: an assumed-role session becomes its role.

    arn:aws:sts::123456789012:assumed-role/Name/session → arn:aws:iam::123456789012:role/Name
    (GetCallerIdentity drops a role's path: configure BROKER_TRUSTED_PRINCIPAL_ARN for one.)
    """
    parts = caller_arn.split(":", 5)
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        role_name = parts[5].split("/")[1]
        return f"arn:{parts[1]}:iam::{parts[4]}:role/{role_name}"
    return caller_arn
