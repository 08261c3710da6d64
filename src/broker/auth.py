"""Who is calling, and may they: caller authentication (an mTLS client certificate, or a bearer
token of which only the hash is configured) and the per-RPC, per-tenant authorisation policy.

Each kind of credential has its own namespace of identities, so that none can pass for another:

    spiffe://trust-domain/path   a client certificate whose one URI SAN is this SPIFFE ID
    dns:NAME                     a client certificate with the DNS SAN NAME and no SPIFFE ID,
                                 only where the policy names dns:NAME
    token:NAME                   a bearer token whose hash BROKER_TOKEN_HASHES holds as NAME

What grpc's `auth_context()` tells about a TLS peer (grpcio 1.85, observed): `peer_uri` holds
every URI SAN and `peer_dns` every DNS SAN, each list typed; `peer_spiffe_id` is there only for
exactly one URI SAN; `x509_subject_alternative_name` lists every kind untyped (a DNS SAN
`spiffe://…` reads there like a URI SAN), so it is never read. Every one of them stops at a NUL
byte (a URI SAN `spiffe://a/b\\0x` reads as `spiffe://a/b`), so the names are compared with the
certificate itself (`x509_pem_cert`) before one becomes an identity.

With no authentication configured (allowed on loopback only, see config.py) every caller is
`ANYONE_ON_LOOPBACK` and may call everything.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from broker import validation
from broker.errors import InvalidArgument, PermissionDenied, Unauthenticated

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

# The three identity forms. SPIFFE IDs as the SPIFFE spec has them (lower-case trust domain;
# path segments of letters, digits, . _ -; at most 2048 bytes); DNS names as host names
# (lower-cased, no wildcard); token names as `broker token NAME` and BROKER_TOKEN_HASHES spell them.
SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+", re.ASCII)
MAX_SPIFFE_ID = 2048
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*", re.ASCII)
MAX_DNS_NAME = 253
TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
FORMS = "spiffe://<trust domain>/<path>, dns:<host name> or token:<name>"


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


def is_spiffe_id(text: str) -> bool:
    return (
        len(text) <= MAX_SPIFFE_ID
        and SPIFFE_ID.fullmatch(text) is not None
        and not {".", ".."} & set(text.split("/")[3:])
    )


def canonical_identity(text: str) -> str:
    """The canonical form of an identity the policy names (scheme and DNS name lower-cased).
    Raises ValueError naming the forms."""
    text = text.strip()
    if not text:
        raise ValueError(f"an entry names no identity: name one as {FORMS}")
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(
            f"{text!r} has no scheme: write token:{text} (a bearer token in "
            f"BROKER_TOKEN_HASHES), dns:{text} (a client certificate's DNS name) or a spiffe:// ID"
        )
    if scheme == "spiffe":
        if not is_spiffe_id("spiffe:" + rest):
            raise ValueError(
                f"{text!r} is not a SPIFFE ID: spiffe://<trust domain of a-z 0-9 . _ ->/<path "
                "of segments of A-Z a-z 0-9 . _ ->"
            )
        return "spiffe:" + rest
    if scheme == "dns":
        name = rest.lower()
        if len(name) > MAX_DNS_NAME or not DNS_NAME.fullmatch(name):
            raise ValueError(
                f"{text!r} is not dns:<host name> (labels of letters, digits and -, joined by "
                "dots; no wildcard)"
            )
        return "dns:" + name
    if scheme == "token":
        if not TOKEN_NAME.fullmatch(rest):
            raise ValueError(f"{text!r} is not token:<name of 1-128 A-Z a-z 0-9 . _ ->")
        return "token:" + rest
    raise ValueError(f"{text!r} has the unknown scheme {scheme!r}: an identity is {FORMS}")


def parse_token_hashes(entries: Iterable[str]) -> dict[str, bytes]:
    """`NAME=sha256:<hex>` entries → token name → digest; the policy names that caller
    `token:NAME`. Raises ValueError naming the fix, never repeating a hash or what may be a
    token pasted by mistake."""
    hashes: dict[str, bytes] = {}
    names_by_digest: dict[bytes, str] = {}
    for entry in entries:
        name, sep, value = (part.strip() for part in entry.partition("="))
        match = TOKEN_HASH.fullmatch(value)
        if not sep:
            raise ValueError(
                "an entry is not NAME=sha256:<64 hex digits>; configure only the hash of a token "
                "(`broker token NAME` makes a token and its hash)"
            )
        if name.lower().startswith("token:"):
            raise ValueError(
                f"{name!r}: write the bare name ({name[6:]}=sha256:…); the policy calls it {name}"
            )
        if not TOKEN_NAME.fullmatch(name):
            raise ValueError(f"{name[:64]!r} is not a token name (1-128 A-Z a-z 0-9 . _ -)")
        if match is None:
            raise ValueError(
                f"the value for {name!r} is not sha256:<64 hex digits>; configure only the hash "
                "of a token (`broker token NAME` makes a token and its hash)"
            )
        if name in hashes:
            raise ValueError(f"{name!r} is configured twice; give each token name one hash")
        digest = bytes.fromhex(match[1])
        if digest in names_by_digest:
            raise ValueError(
                f"{names_by_digest[digest]!r} and {name!r} have the same hash, so one token would "
                "be both callers; make one token per caller"
            )
        hashes[name] = digest
        names_by_digest[digest] = name
    return hashes


@dataclass(frozen=True)
class Rule:
    """What one identity may call; `tenants` None means every tenant."""

    rpcs: frozenset[str]
    tenants: frozenset[str] | None = None


@dataclass(frozen=True)
class CallerLimits:
    """A caller's own fair-share limits (the policy file's `limits` table), where they differ
    from the BROKER_* defaults (quotas.py); None keeps the default."""

    max_streams: int | None = None
    tenant_rate: float | None = None
    tenant_burst: int | None = None


# The keys of a [caller.limits] table: their types, and the smallest value each takes.
_LIMIT_KEYS: dict[str, tuple[type, float]] = {
    "max_streams": (int, 1),
    "tenant_rate": (float, 0.001),
    "tenant_burst": (int, 1),
}


def _limits(table: object) -> CallerLimits:
    """A `limits` table, read strictly: known keys, numbers of the right kind (TOML's, no
    strings or booleans), within range; anything else is refused."""
    if not isinstance(table, dict):
        raise ValueError("limits must be a table, e.g. limits = { max_streams = 500 }")
    unknown = set(table) - set(_LIMIT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown limit {', '.join(sorted(unknown))} (the limits are {', '.join(_LIMIT_KEYS)})"
        )
    values: dict[str, float] = {}
    for key, value in table.items():
        kind, least = _LIMIT_KEYS[key]
        numeric = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ValueError(f"limits.{key} must be {'a whole' if kind is int else 'a'} number")
        if not value >= least or value != value or value == float("inf"):
            raise ValueError(f"limits.{key} must be at least {least:g} (and finite)")
        values[key] = value
    return CallerLimits(**values)  # type: ignore[arg-type]


def _rpcs(names: Sequence[str]) -> frozenset[str]:
    if not any(names):
        raise ValueError("no RPCs: name a group (connections, credentials, all) or RPCs")
    if not all(names):
        raise ValueError("an empty RPC name in the list: name each RPC or group")
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


def _tenants(names: Sequence[str]) -> frozenset[str]:
    if not names or not all(names):
        raise ValueError(
            "an empty tenant list or tenant name (an unset template variable?): name each "
            "tenant, or leave the tenants out to allow every tenant"
        )
    for name in names:
        if name == "*":
            raise ValueError("'*' is not a tenant: omit @… (or tenants) for every tenant")
        try:
            validation.field("tenant_id", name)
        except InvalidArgument as exc:
            raise ValueError(f"tenant {name!r} {exc.description}") from None
    return frozenset(names)


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(
            f'{what} must be a list of strings, e.g. ["a", "b"] (a single string would be '
            "read letter by letter)"
        )
    return value


class Policy:
    """Identities → the RPCs (and optionally tenants) each may call. Anything else is denied.
    Parsing fails closed: every doubtful entry is refused (ValueError), never read as a grant."""

    def __init__(
        self, rules: Mapping[str, Rule], limits: Mapping[str, CallerLimits] | None = None
    ) -> None:
        if not rules:
            raise ValueError(
                "no rules: name who may call what, e.g. 'token:launcher=credentials' "
                "(identity=rpcs[@tenant|…]; …)"
            )
        self.rules = dict(rules)
        self.limits = dict(limits or {})  # identity → its own limits (policy file only)

    @property
    def dns_names(self) -> frozenset[str]:
        """The host names of the policy's `dns:` identities: the only DNS SANs that count."""
        return frozenset(name.removeprefix("dns:") for name in self.rules if name[:4] == "dns:")

    @classmethod
    def parse(cls, text: str) -> Policy:
        """`identity=group-or-rpc[,…][@tenant|tenant…]; …`, e.g.
        `spiffe://example.org/ui=connections; token:launcher=credentials@acme|globex`."""
        rules: dict[str, Rule] = {}
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            if entry.count("=") != 1:
                raise ValueError(f"{entry!r} is not identity=rpcs[@tenant|…]")
            who, _, grant = entry.partition("=")
            names, at, tenants = grant.partition("@")
            try:
                _add(
                    rules,
                    who,
                    [name.strip() for name in names.split(",")],
                    [tenant.strip() for tenant in tenants.split("|")] if at else None,
                )
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
        return cls(rules)

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """`[[caller]]` tables of `identity`, `rpcs` and optional `tenants` (lists of strings)."""
        document: dict[str, Any] = tomllib.loads(text)
        if set(document) - {"caller"}:
            unknown = ", ".join(sorted(set(document) - {"caller"}))
            raise ValueError(f"unknown key {unknown}: the file holds [[caller]] tables only")
        callers = document.get("caller", [])
        if not isinstance(callers, list) or not all(isinstance(c, dict) for c in callers):
            raise ValueError("caller must be an array of tables: write each one as [[caller]]")
        rules: dict[str, Rule] = {}
        limits: dict[str, CallerLimits] = {}
        for number, table in enumerate(callers, 1):
            where = f"[[caller]] #{number}"
            if set(table) - {"identity", "rpcs", "tenants", "limits"}:
                unknown = ", ".join(sorted(set(table) - {"identity", "rpcs", "tenants", "limits"}))
                raise ValueError(
                    f"{where}: unknown key {unknown} (the keys are identity, rpcs, tenants and "
                    "limits)"
                )
            who = table.get("identity")
            if not isinstance(who, str):
                raise ValueError(f'{where}: identity must be a string, e.g. "token:launcher"')
            try:
                tenants = table.get("tenants")
                _add(
                    rules,
                    who,
                    _strings(table.get("rpcs"), "rpcs"),
                    None if tenants is None else _strings(tenants, "tenants"),
                )
                if "limits" in table:
                    limits[canonical_identity(who)] = _limits(table["limits"])
            except ValueError as exc:
                raise ValueError(f"{where} ({who}): {exc}") from None
        return cls(rules, limits)

    def authorise(self, caller: Caller, rpc: str, tenant_id: str) -> None:
        rule = self.rules.get(caller.identity)
        if rule is None or rpc not in rule.rpcs:
            raise PermissionDenied(f"{caller.identity} may not call {rpc}")
        if rule.tenants is not None and tenant_id not in rule.tenants:
            raise PermissionDenied(f"{caller.identity} may not call {rpc} for this tenant")


def _add(
    rules: dict[str, Rule], who: str, rpcs: Sequence[str], tenants: Sequence[str] | None
) -> None:
    key = canonical_identity(who)
    if key in rules:
        raise ValueError(f"{key} has a second entry; give each identity one entry")
    rules[key] = Rule(_rpcs(rpcs), None if tenants is None else _tenants(tenants))


class PeerContext(Protocol):
    """The part of a call's context that names its TLS peer (grpc's ServicerContext)."""

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


class Guard:
    """Authenticates each call and applies the policy. Holds only token hashes."""

    def __init__(
        self, *, mtls: bool, token_hashes: Mapping[str, bytes], policy: Policy | None
    ) -> None:
        if policy is None and (mtls or token_hashes):
            raise ValueError("caller authentication needs a policy of who may call what")
        self._mtls = mtls
        self._tokens = [("token:" + name, digest) for name, digest in token_hashes.items()]
        self._policy = policy
        self._dns_names = policy.dns_names if policy is not None else frozenset()
        # No authentication configured (loopback only). An attribute: asked on every call.
        self.open = not self._mtls and not self._tokens

    def caller(self, context: PeerContext, metadata: Any) -> Caller:
        """The caller of one call: its client certificate's identity, else its token's."""
        if self.open:
            return ANYONE_ON_LOOPBACK
        if self._mtls:
            found = self._certificate_caller(context.auth_context())
            if found is not None:
                return found
        token = _bearer(metadata)
        if token is not None and self._tokens:
            digest = hashlib.sha256(token.encode()).digest()
            found = None
            for name, expected in self._tokens:  # every entry, so timing tells nothing
                if hmac.compare_digest(digest, expected):
                    found = Caller(name, "token")
            if found is not None:
                return found
            raise Unauthenticated("the bearer token is not valid")
        if self._mtls:
            raise Unauthenticated(
                "the client certificate names no caller: it needs one URI SAN with a SPIFFE ID, "
                "or a DNS SAN the policy names as dns:NAME"
                + (" (or send 'authorization: Bearer <token>')" if self._tokens else "")
            )
        raise Unauthenticated("no caller identity: send 'authorization: Bearer <token>'")

    def _certificate_caller(self, peer: Mapping[str, Iterable[bytes]]) -> Caller | None:
        """The SPIFFE ID of the certificate's one URI SAN, else the one DNS SAN the policy
        names (dns:NAME), else None. Several URI SANs, or DNS SANs naming several callers,
        are refused: the certificate would not name one caller."""
        uris = list(peer.get("peer_uri", ()))
        dns = list(peer.get("peer_dns", ()))
        if len(uris) > 1:
            raise Unauthenticated(
                f"the client certificate has {len(uris)} URI SANs: it must have one (its SPIFFE "
                "ID), so that it names one caller"
            )
        if not uris and not dns:
            return None
        pem = next(iter(peer.get("x509_pem_cert", ())), b"")
        if _certificate_names(pem) != (tuple(sorted(uris)), tuple(sorted(dns))):
            raise Unauthenticated(
                "the client certificate's names do not read the same in grpc and in the "
                "certificate (a NUL byte in a SAN?)"
            )
        if uris and uris[0][:7].lower() == b"spiffe:":
            spiffe_id = uris[0].decode("ascii", "replace")
            if not is_spiffe_id(spiffe_id):
                raise Unauthenticated(
                    "the client certificate's URI SAN is not a SPIFFE ID "
                    "(spiffe://trust-domain/path)"
                )
            return Caller(spiffe_id, "mtls")
        named = {name.decode("ascii", "replace").lower() for name in dns} & self._dns_names
        if len(named) > 1:
            raise Unauthenticated(
                f"the client certificate's DNS SANs name {len(named)} callers of the policy: "
                "issue it for one"
            )
        return Caller("dns:" + named.pop(), "mtls") if named else None

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


@functools.lru_cache(maxsize=1024)
def _certificate_names(pem: bytes) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    """(URI SANs, DNS SANs), each sorted, of a PEM certificate, read by `cryptography` for
    `Guard._certificate_caller` to compare with grpc's view; None if it cannot be read.
    Cached: a client sends the same certificate on every call of a connection."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return (), ()
        uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
        dns = names.value.get_values_for_type(x509.DNSName)
        return (
            tuple(sorted(name.encode() for name in uris)),
            tuple(sorted(name.encode() for name in dns)),
        )
    except ValueError:  # not a certificate, or a SAN that is not IA5 text
        return None
