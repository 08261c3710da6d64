"""The broker's domain errors. Handlers map each class to one gRPC status code (service.py).

    BrokerError
    ├── Unauthenticated        no caller identity, or a bad one (wrong token, no certificate)
    ├── PermissionDenied       the caller may not call this RPC, or not for this tenant
    ├── DeadlineExceeded       a call without a deadline ran past the server's cap
    ├── InvalidArgument        a malformed or missing request field (carries the field name)
    ├── NotFound               no connection for the tenant
    ├── AlreadyExists          CreateConnection on an ACTIVE connection
    ├── FailedPrecondition     the customer (or the caller) must change something first
    │   ├── NotActive          the connection is not ACTIVE
    │   ├── VerificationFailed a VerifyRole check failed (carries the checks)
    │   ├── RoleNotAssumable   AWS refuses AssumeRole: role deleted, trust policy changed
    │   └── StreamEnded        the run was released or the tenant disconnected
    ├── Aborted                a concurrent change won, again and again; retry
    │   └── GrantChanged       the tenant's connection changed while credentials were minted
    └── Unavailable            retryable: STS throttled or unreachable, shutting down

`aws.py` is the one place that turns botocore errors into these; nothing else sees botocore.
"""

from __future__ import annotations

from dataclasses import dataclass


class BrokerError(Exception):
    """Base of every error the broker reports to a caller. The message is safe to show."""


class Unauthenticated(BrokerError):
    pass


class PermissionDenied(BrokerError):
    pass


class DeadlineExceeded(BrokerError):
    pass


class InvalidArgument(BrokerError):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(BrokerError):
    pass


class AlreadyExists(BrokerError):
    pass


@dataclass(frozen=True)
class Violation:
    """One precondition the customer or caller must satisfy (google.rpc.PreconditionFailure)."""

    type: str
    subject: str
    description: str


class FailedPrecondition(BrokerError):
    """`reason` (with `metadata`), when set, goes out as a google.rpc.ErrorInfo beside the
    PreconditionFailure: the machine-readable why (e.g. RUN_RELEASED, TENANT_DISCONNECTED),
    for clients that must tell a normal end from a refusal."""

    violation_type = "CONNECTION"

    def __init__(
        self,
        message: str,
        subject: str = "",
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.reason = reason
        self.metadata = metadata or {}

    @property
    def violations(self) -> list[Violation]:
        return [Violation(self.violation_type, self.subject, str(self))]


class NotActive(FailedPrecondition):
    violation_type = "CONNECTION_NOT_ACTIVE"


class RoleNotAssumable(FailedPrecondition):
    """AWS refused AssumeRole for a reason only the customer can fix. `code` is AWS's error code."""

    violation_type = "ROLE_NOT_ASSUMABLE"

    def __init__(self, message: str, subject: str = "", code: str = "") -> None:
        super().__init__(message, subject, reason="ROLE_NOT_ASSUMABLE")
        self.code = code


class StreamEnded(FailedPrecondition):
    violation_type = "STREAM_ENDED"


class VerificationFailed(FailedPrecondition):
    violation_type = "VERIFICATION_FAILED"

    def __init__(self, message: str, subject: str, failed: list[tuple[str, str]]) -> None:
        super().__init__(message, subject)
        self.failed = failed

    @property
    def violations(self) -> list[Violation]:
        return [Violation(self.violation_type, name, detail) for name, detail in self.failed]


class Aborted(BrokerError):
    """A concurrent change to the same connection kept winning; the caller may retry."""


class GrantChanged(Aborted):
    """The tenant's connection changed (still ACTIVE: a new role, or verified again) while
    credentials were being minted under the old grant: read the grant again and retry."""


MAX_RETRY_AFTER = 86_400.0


class ResourceExhausted(BrokerError):
    """A limit of the caller's or the tenant's share was reached (google.rpc.QuotaFailure).

    `limit` names the setting (e.g. BROKER_TENANT_STS_RATE), `subject` whose share it is
    ("tenant:acme", "caller:token:launcher"), `reason` the ErrorInfo reason, and `retry_after`
    the seconds after which a retry can succeed (RetryInfo), None where waiting does not help
    by itself (streams stay open until someone closes one)."""

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        subject: str,
        reason: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.subject = subject
        self.reason = reason
        # A day at most: RetryInfo's Duration must stay representable whatever the rate.
        self.retry_after = None if retry_after is None else min(retry_after, MAX_RETRY_AFTER)


class Unavailable(BrokerError):
    """Retryable: the caller should try again (elsewhere)."""


class TransientAwsError(Unavailable):
    """STS or IAM throttled, failed with 5xx, or could not be reached."""


class ShuttingDown(Unavailable):
    pass
