"""The async AWS client (aiobotocore): one long-lived STS client per region, failover between
them, and the one place where botocore's errors become domain errors (errors.py), each marked
transient or permanent.

STS regional failover (BROKER_STS_REGIONS): a call goes to the first region whose circuit
breaker is closed. A transient failure there (unreachable, timeout, 5xx, throttled after
botocore's retries) opens that region's breaker for the cooldown and moves the same call on to
the next region. After the cooldown one call tries the region again (half-open): an answer
closes the breaker, a failure opens it for another cooldown. When every region is open, calls
still try them all, soonest to close first. A permanent answer (the role refused, a
ValidationError, the broker's own identity refused) ends the call where it was given: a
refusal in one region is never put to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    UnknownRegionError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from broker.config import ConfigError, parse_endpoint_urls
from broker.errors import BrokerError, RoleNotAssumable, TransientAwsError, Unavailable
from broker.metrics import Metrics
from broker.models import Credentials

if TYPE_CHECKING:
    from types_aiobotocore_sts import STSClient

log = logging.getLogger(__name__)
T = TypeVar("T")

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
# Not the role's answer: STS not activated in this region for the account, or no STS error at
# all (a proxy's page botocore could parse as XML): another region may answer.
REGIONAL_CODES = frozenset({"RegionDisabledException"})
# Our own identity is broken: not the customer's to fix, and not worth retrying at once.
BROKER_IDENTITY_CODES = frozenset(
    {"InvalidClientTokenId", "ExpiredToken", "SignatureDoesNotMatch", "UnrecognizedClientException"}
)

# One region alone, and IAM: botocore's standard retry mode (backoff with jitter for
# throttling, 5xx and connection errors), three attempts, patient timeouts: there is nowhere
# else to go.
CLIENT_CONFIG = AioConfig(
    retries={"mode": "standard", "total_max_attempts": 3},
    connect_timeout=2,
    read_timeout=5,
    max_pool_connections=64,
)
# Each of several STS regions: the next region is the retry. Two attempts absorb a blip (a
# pooled connection the server closed, one 5xx) without opening the breaker; short timeouts
# bound what a region that accepts connections and never answers costs a call before it moves
# on: two 2 s waits plus botocore's backoff (up to 1 s), not three of 5 s plus up to 3 s.
# AssumeRole answers in well under a second when STS is healthy.
FAILOVER_CONFIG = AioConfig(
    retries={"mode": "standard", "total_max_attempts": 2},
    connect_timeout=1,
    read_timeout=2,
    max_pool_connections=64,
)


SLOW_ANSWER = 1.0  # seconds: AssumeRole answers in well under this when STS is healthy

# botocore's errors that say the endpoint failed: refused, reset, timed out, cut short.
UNREACHABLE = (BotoConnectionError, HTTPClientError, IncompleteReadError)


class NotSent(TransientAwsError):
    """botocore failed before any endpoint was asked: the broker's own credentials could not
    be loaded (say, the Pod Identity agent is restarting), or it refused the parameters. Every
    region would fail alike, so it moves no call on and opens no breaker."""


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


@dataclass
class Region:
    """One STS region: its client and its circuit breaker. The breaker's fields are changed
    only on the event loop, by `pick` and AwsClient (`_answered`, `_failed`)."""

    name: str
    endpoint_url: str | None  # None: AWS's regional endpoint
    client: STSClient | None = None
    # None: closed (in use). Else the loop time until which it is skipped; past it, half-open.
    open_until: float | None = None
    # A call is trying it after its cooldown (half-open): others skip it meanwhile.
    trial: bool = False

    def state(self, now: float) -> str:
        """closed, open or half_open (metrics.BREAKER_STATES)."""
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half_open"


class AwsClient:
    """STS (and, for VerifyRole, IAM) for the broker. Create once; `close()` at shutdown.

    `regions`: the STS regions in order of preference (default: `region` alone), each at its
    entry in `sts_endpoint_urls` (REGION=URL items), else `endpoint_url`, else AWS's regional
    endpoint. IAM is global: it is asked at `endpoint_url` (or AWS's), signed for the first
    region. ConfigError for regions failover cannot use (`check_regions`)."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        regions: Sequence[str] = (),
        sts_endpoint_urls: Sequence[str] = (),
        cooldown: float = 30.0,
        static_credentials: tuple[str, str] | None = None,
        max_concurrency: int = 32,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = tuple(regions) or (region,)
        try:
            urls = parse_endpoint_urls(tuple(sts_endpoint_urls))
        except ValueError as exc:
            raise ConfigError(f"BROKER_STS_ENDPOINT_URLS: {exc}") from None
        check_regions(names, urls)
        self._regions = [Region(name, urls.get(name, endpoint_url)) for name in names]
        self._iam_region = names[0]
        self._endpoint_url = endpoint_url
        self._cooldown = cooldown
        self._clock = clock
        self._session = get_session()
        # The regional endpoint: no dependence on us-east-1 for a broker that runs elsewhere.
        self._session.set_config_variable("sts_regional_endpoints", "regional")
        if static_credentials is not None:
            self._session.set_credentials(*static_credentials)
        self._stack = contextlib.AsyncExitStack()
        # At most this many AssumeRole calls at once, failover included: a burst of new runs,
        # or renewals resuming after an outage, queues here instead of hammering STS.
        self._sts_slots = asyncio.Semaphore(max_concurrency)
        self._metrics = metrics or Metrics()
        if len(self._regions) > 1:
            self._metrics.sts_regions(names, self.breaker_states)

    async def start(self) -> None:
        config = CLIENT_CONFIG if len(self._regions) == 1 else FAILOVER_CONFIG
        for region in self._regions:
            region.client = await self._stack.enter_async_context(
                self._session.create_client(
                    "sts",
                    region_name=region.name,
                    endpoint_url=region.endpoint_url,
                    config=config,
                )
            )
            if len(self._regions) > 1:
                region.client.meta.events.register(
                    "needs-retry.sts", functools.partial(self._attempted, region)
                )

    async def close(self) -> None:
        await self._stack.aclose()

    def breaker_states(self) -> dict[str, str]:
        """Each region's breaker now: closed, open or half_open."""
        now = self._clock()
        return {region.name: region.state(now) for region in self._regions}

    async def caller_arn(self) -> str:
        """The broker's own principal, as customers' trust policies must name it."""
        answer = await self._in_regions(
            "sts:GetCallerIdentity", "", lambda sts: sts.get_caller_identity(), counted=False
        )
        return principal_arn(answer["Arn"])

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
                answer = await self._in_regions(
                    "sts:AssumeRole",
                    request.role_arn,
                    lambda sts: sts.assume_role(**params),
                    counted=True,
                )
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

    async def _in_regions(
        self,
        action: str,
        resource: str,
        call: Callable[[STSClient], Awaitable[T]],
        *,
        counted: bool,
    ) -> T:
        """`call` in the first region that answers: a transient failure moves it on to the
        next region; any answer, a refusal included, ends it. `counted`: per-region metrics."""
        tried: list[tuple[str, TransientAwsError]] = []
        while (picked := pick(self._regions, {n for n, _ in tried}, self._clock())) is not None:
            region, trial = picked
            outcome = "abandoned"
            asked_at = self._clock()
            try:
                assert region.client is not None, "AwsClient.start() was not called"
                with translate_errors(action, resource):
                    answer = await call(region.client)
                outcome = "ok"
                self._answered(region)
                return answer
            except NotSent:
                outcome = "transient"
                raise
            except TransientAwsError as failure:
                outcome = "transient"
                self._failed(region, why(failure))
                tried.append((region.name, failure))
            except asyncio.CancelledError:
                # Its caller gave up (a deadline shorter than one attempt here): a region that
                # kept it waiting past a healthy answer's time is not asked first again.
                if len(self._regions) > 1 and self._clock() - asked_at >= SLOW_ANSWER:
                    self._failed(region, "abandoned while waiting")
                raise
            except BrokerError as refused:  # the role refused, or our identity: an answer
                outcome = "denied" if isinstance(refused, RoleNotAssumable) else "transient"
                self._answered(region)
                raise
            finally:
                if trial:
                    region.trial = False
                if counted:
                    self._metrics.sts_region_calls.labels(region.name, outcome).inc()
            if counted and len(tried) < len(self._regions):
                self._metrics.sts_failovers.labels(region.name).inc()
        if len(tried) == 1:
            raise tried[0][1]
        said = ", ".join(f"{name}: {why(failure)}" for name, failure in tried)
        raise TransientAwsError(
            f"{action} failed transiently in every STS region ({said}); retry"
        ) from tried[-1][1]

    def _answered(self, region: Region) -> None:
        """The region answered (credentials or a refusal): its breaker closes."""
        if region.open_until is not None:
            region.open_until = None
            log.info("STS region answers again", extra={"region": region.name})

    def _failed(self, region: Region, reason: str) -> None:
        """The region failed transiently: skipped for the cooldown (from now)."""
        if region.open_until is None:
            log.warning(
                "STS region failing; skipped while it cools down",
                extra={"region": region.name, "error": reason, "cooldown": self._cooldown},
            )
        region.open_until = self._clock() + self._cooldown

    def _attempted(
        self, region: Region, caught_exception: Exception | None = None, **_: Any
    ) -> None:
        """After each of botocore's attempts in a region (its needs-retry event): an attempt
        that timed out, or whose connection was refused, opens the breaker at once, so calls
        that start while this one makes its second attempt go elsewhere instead of waiting on
        the same region. Returns None: botocore alone decides whether to retry."""
        if isinstance(
            caught_exception, ConnectTimeoutError | ReadTimeoutError | EndpointConnectionError
        ):
            self._failed(region, type(caught_exception).__name__)

    async def read_trust_policy(self, credentials: Credentials, role_arn: str) -> dict[str, Any]:
        """The role's trust policy, read with the role's own (read-only) credentials.

        Raises RoleNotAssumable when the role may not read itself (iam:GetRole denied)."""
        async with self._session.create_client(
            "iam",
            region_name=self._iam_region,
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


def pick(regions: Sequence[Region], tried: set[str], now: float) -> tuple[Region, bool] | None:
    """The region a call tries next, and whether it is that region's half-open trial (then
    marked taken): the first in order not yet `tried` whose breaker is closed, or whose
    cooldown is over with no call trying it yet; else, every one left being open, the one
    whose cooldown ends soonest. None: every region was tried."""
    left = [region for region in regions if region.name not in tried]
    for region in left:
        if region.open_until is None:
            return region, False
        if now >= region.open_until and not region.trial:
            region.trial = True
            return region, True
    if not left:
        return None
    return min(left, key=lambda region: region.open_until or 0.0), False


def check_regions(regions: Sequence[str], endpoint_urls: Mapping[str, str]) -> None:
    """Refuse STS regions failover cannot use (ConfigError): one no AWS partition holds, or
    regions of different partitions (credentials of one partition are refused in another,
    so the second region would fail exactly when the first is down). Warn about a region
    this botocore does not list (a newer region, or a misspelt one)."""
    session = botocore.session.get_session()
    partitions: dict[str, str] = {}
    for region in regions:
        try:
            partitions[region] = session.get_partition_for_region(region)
        except UnknownRegionError:
            raise ConfigError(
                f"BROKER_STS_REGIONS: {region} is in no AWS partition (e.g. us-east-1, "
                "cn-north-1, us-gov-west-1)"
            ) from None
        if region not in session.get_available_regions("sts", partitions[region]):
            log.warning(
                "an STS region this botocore does not know: check its spelling",
                extra={"region": region},
            )
    if len(set(partitions.values())) > 1:
        listed = ", ".join(f"{region} ({partition})" for region, partition in partitions.items())
        raise ConfigError(f"BROKER_STS_REGIONS mixes AWS partitions: {listed}")
    for region in endpoint_urls:
        if region not in partitions:
            raise ConfigError(f"BROKER_STS_ENDPOINT_URLS names {region}, not an STS region")


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
        if exc.operation_name != action.partition(":")[2]:
            # Raised while botocore refreshed the broker's OWN credentials (IRSA, Pod
            # Identity: AssumeRoleWithWebIdentity): never the customer's role speaking.
            log.error(
                "the broker's own AWS credentials could not be refreshed",
                extra={"aws_code": code, "operation": exc.operation_name},
            )
            raise Unavailable(
                f"{action}: the broker's own AWS credentials could not be refreshed ({code})"
            ) from None
        if (
            code in TRANSIENT_CODES
            or status >= 500
            or code in REGIONAL_CODES
            or "Code" not in error
        ):
            raise TransientAwsError(f"{action} failed transiently ({code}); retry") from exc
        if code in BROKER_IDENTITY_CODES:
            log.error("the broker's own AWS identity was refused", extra={"aws_code": code})
            raise Unavailable(f"{action}: the broker's AWS identity was refused ({code})") from exc
        raise RoleNotAssumable(f"{code}: {message}", subject=resource, code=code) from exc
    except ResponseParserError:
        # Its text holds the body it could not parse: an AssumeRole answer cut short holds a
        # secret key. Neither chained nor logged.
        raise TransientAwsError(f"{action}: an answer that is not STS's (unparsable)") from None
    except UNREACHABLE as exc:
        raise TransientAwsError(
            f"{action}: AWS could not be reached ({type(exc).__name__})"
        ) from exc
    except BotoCoreError as exc:
        raise NotSent(f"{action} was not sent ({type(exc).__name__}); retry") from exc


def why(failure: TransientAwsError) -> str:
    """What a transient failure was, in a word: AWS's error code, or botocore's exception."""
    cause = failure.__cause__
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code", "Unknown"))
    return type(cause).__name__ if cause is not None else str(failure)


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
