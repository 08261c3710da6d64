"""Who is calling, and may they: caller authentication (an mTLS client certificate, or a bearer
token of which only the hash is configured) and the per-RPC authorisation policy.

With no authentication configured (allowed on loopback only, see config.py) every caller is
`ANYONE_ON_LOOPBACK` and may call everything.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.errors import PermissionDenied, Unauthenticated

CONNECTION_RPCS = frozenset(
    {"CreateConnection", "VerifyRole", "GetConnection", "Disconnect", "ListConnectionEvents"}
)
CREDENTIAL_RPCS = frozenset({"IssueCredentials", "WatchCredentials", "ReleaseCredentials"})
GROUPS = {
    "connections": CONNECTION_RPCS,
    "credentials": CREDENTIAL_RPCS,
    "all": CONNECTION_RPCS | CREDENTIAL_RPCS,
}
TOKEN_HASH = re.compile(r"sha256:([0-9a-f]{64})")
TOKEN_BYTES = 32


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: `identity` is what the policy names and the logs show."""

    identity: str
    method: str  # "mtls", "token" or "none"


ANYONE_ON_LOOPBACK = Caller("anonymous@loopback", "none")
# The caller of the RPC being handled (set per call by the service; tasks started while handling
# it, such as an STS call, inherit it): who the audit trail names.
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "caller", default=ANYONE_ON_LOOPBACK
)


def hash_token(token: str) -> str:
    """What is configured for a token (`sha256:<hex>`). Tokens are random and long, so a fast
    hash is enough: nobody can guess one from its hash."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class PeerContext(Protocol):
    """The part of a call's context that names its TLS peer (grpc's ServicerContext)."""

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def parse_token_hashes(entries: Iterable[str]) -> dict[str, bytes]:
    """`identity=sha256:<hex>` entries → identity → digest. Raises ValueError naming the fix."""
    hashes: dict[str, bytes] = {}
    for entry in entries:
        identity, _, value = entry.rpartition("=")
        match = TOKEN_HASH.fullmatch(value.strip())
        if not identity.strip() or match is None:
            raise ValueError(
                f"{entry[:24]!r}… is not identity=sha256:<64 hex digits>; configure only the hash "
                "of a token (`broker token` makes a token and its hash)"
            )
        hashes[identity.strip()] = bytes.fromhex(match[1])
    return hashes


@dataclass(frozen=True)
class Rule:
    """What one identity may call; `tenants` None means every tenant."""

    rpcs: frozenset[str]
    tenants: frozenset[str] | None = None


def _rpcs(names: Sequence[str]) -> frozenset[str]:
    allowed: set[str] = set()
    for name in names:
        if name in GROUPS:
            allowed |= GROUPS[name]
        elif name in GROUPS["all"]:
            allowed.add(name)
        else:
            raise ValueError(
                f"unknown RPC or group {name!r} (groups: {', '.join(GROUPS)}; or RPC names)"
            )
    return frozenset(allowed)


class Policy:
    """Identities → the RPCs (and optionally tenants) each may call. Anything else is denied."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = dict(rules)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """`identity=group-or-rpc[,…][@tenant|tenant…]; …`, e.g.
        `spiffe://example.org/ui=connections; spiffe://example.org/launcher=credentials`."""
        rules = {}
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            identity, sep, grant = entry.rpartition("=")
            if not sep or not identity.strip():
                raise ValueError(f"{entry!r} is not identity=rpcs[@tenants]")
            names, _, tenants = grant.partition("@")
            rules[identity.strip()] = Rule(
                _rpcs([n.strip() for n in names.split(",") if n.strip()]),
                frozenset(t.strip() for t in tenants.split("|")) if tenants else None,
            )
        return cls(rules)

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """`[[caller]]` tables with `identity`, `rpcs` and optional `tenants` lists."""
        document: dict[str, Any] = tomllib.loads(text)
        rules = {}
        for caller in document.get("caller", []):
            tenants = caller.get("tenants")
            rules[str(caller["identity"])] = Rule(
                _rpcs(list(caller["rpcs"])), frozenset(tenants) if tenants is not None else None
            )
        return cls(rules)

    def authorise(self, caller: Caller, rpc: str, tenant_id: str) -> None:
        rule = self.rules.get(caller.identity)
        if rule is None or rpc not in rule.rpcs:
            raise PermissionDenied(f"{caller.identity} may not call {rpc}")
        if rule.tenants is not None and tenant_id not in rule.tenants:
            raise PermissionDenied(f"{caller.identity} may not call {rpc} for this tenant")


class Guard:
    """Authenticates each call and applies the policy. Holds only token hashes."""

    def __init__(
        self, *, mtls: bool, token_hashes: Mapping[str, bytes], policy: Policy | None
    ) -> None:
        self._mtls = mtls
        self._tokens = list(token_hashes.items())
        self._policy = policy

    @property
    def open(self) -> bool:
        """No authentication configured (loopback only)."""
        return not self._mtls and not self._tokens

    def caller(self, context: PeerContext, metadata: Any) -> Caller:
        """The caller of one call, from its TLS peer (SPIFFE ID, else DNS SAN) or its token."""
        if self.open:
            return ANYONE_ON_LOOPBACK
        if self._mtls:
            auth_context = context.auth_context()
            for key in ("peer_spiffe_id", "peer_dns"):
                name = next(iter(auth_context.get(key, ())), None)
                if name:
                    return Caller(name.decode(), "mtls")
        token = _bearer(metadata)
        if token is not None and self._tokens:
            digest = hashlib.sha256(token.encode()).digest()
            found = None
            for identity, expected in self._tokens:  # every entry, so timing tells nothing
                if hmac.compare_digest(digest, expected):
                    found = identity
            if found is not None:
                return Caller(found, "token")
            raise Unauthenticated("the bearer token is not valid")
        raise Unauthenticated(
            "no caller identity: present a client certificate (mTLS) or "
            "'authorization: Bearer <token>'"
        )

    def check(self, caller: Caller, rpc: str, tenant_id: str) -> None:
        if self._policy is not None and caller is not ANYONE_ON_LOOPBACK:
            self._policy.authorise(caller, rpc, tenant_id)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
