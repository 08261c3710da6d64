"""IAM role trust policies: an evaluator, and the read-back VerifyRole applies.

`allows` says whether a principal may do an action under a policy, given the request's
condition keys, as AWS evaluates it: the local AWS emulator enforces trust policies with it
(moto does not). It understands Allow/Deny, Principal and NotPrincipal ("*", {"AWS": ...} by
ARN, account or "*"), Action and NotAction (with wildcards), and the string, ARN and Null
condition operators with their `ForAnyValue:`/`ForAllValues:` qualifiers and `IfExists` suffix.
What it cannot evaluate fails closed: such a condition never grants, and always denies.

`admits_only` is stricter than any evaluation: it reads a trust policy and says whether it lets
in nothing but the broker, and the broker only with exactly one external ID. The external ID is
not a secret (it travels in the quick-create link), so a role that admits any other principal,
or the broker with any other ID, is open to the confused deputy problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

Context = Mapping[str, str | None]
EXTERNAL_ID_KEY = "sts:externalid"  # condition keys compare case-insensitively


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """IAM's wildcards: `*` any run of characters, `?` one character; nothing else is special
    (unlike fnmatch, `[` is literal)."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
        re.DOTALL,
    )


def _equal(actual: str, wanted: str) -> bool:
    return actual == wanted


def _equal_ignoring_case(actual: str, wanted: str) -> bool:
    return actual.lower() == wanted.lower()


def _like(actual: str, wanted: str) -> bool:
    return _glob(wanted).fullmatch(actual) is not None


# Operator (without qualifier or IfExists) → (compare one request value with one policy value,
# negated). Negated operators hold when the request value matches none of the policy values.
_STRING_OPERATORS: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    "StringEquals": (_equal, False),
    "StringNotEquals": (_equal, True),
    "StringEqualsIgnoreCase": (_equal_ignoring_case, False),
    "StringNotEqualsIgnoreCase": (_equal_ignoring_case, True),
    "StringLike": (_like, False),
    "StringNotLike": (_like, True),
    "ArnEquals": (_like, False),
    "ArnLike": (_like, False),
    "ArnNotEquals": (_like, True),
    "ArnNotLike": (_like, True),
}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _account_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[4] if len(parts) > 4 else ""


def _role_of(arn: str) -> str | None:
    """`partition:account/role-name` for a role ARN (any path) or an assumed-role session ARN."""
    parts = arn.split(":", 5)
    if len(parts) != 6:
        return None
    resource = parts[5]
    if parts[2] == "iam" and resource.startswith("role/"):
        return f"{parts[1]}:{parts[4]}/{resource.rsplit('/', 1)[-1]}"
    if parts[2] == "sts" and resource.startswith("assumed-role/"):
        return f"{parts[1]}:{parts[4]}/{resource.split('/')[1]}"
    return None


def _names(value: str, caller_arn: str) -> bool:
    """Whether one principal value of a policy names `caller_arn`."""
    if value in ("*", caller_arn):
        return True
    whole_account = value.isdigit() or value.endswith(":root")
    if whole_account and _account_of(caller_arn) in (value, _account_of(value)):
        return True
    role = _role_of(value)
    return role is not None and role == _role_of(caller_arn)


def principal_matches(principal: Any, caller_arn: str) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict):
        return False
    return any(
        isinstance(value, str) and _names(value, caller_arn)
        for value in _listed(principal.get("AWS", []))
    )


def _action_matches(patterns: Any, action: str) -> bool:
    return any(
        _glob(str(pattern).lower()).fullmatch(action.lower()) is not None
        for pattern in _listed(patterns)
    )


def _applies_to(statement: Mapping[str, Any], caller_arn: str, action: str) -> bool:
    if "NotPrincipal" in statement:
        principal_ok = not principal_matches(statement["NotPrincipal"], caller_arn)
    else:
        principal_ok = principal_matches(statement.get("Principal"), caller_arn)
    if "NotAction" in statement:
        action_ok = not _action_matches(statement["NotAction"], action)
    else:
        action_ok = _action_matches(statement.get("Action", []), action)
    return principal_ok and action_ok


def _condition_holds(operator: str, key: str, wanted: Any, context: Context) -> bool | None:
    """Whether one operator/key pair holds; None when it cannot be evaluated."""
    actual = {k.lower(): v for k, v in context.items()}.get(key.lower())
    values = [v for v in _listed(wanted) if isinstance(v, str | int | float | bool)]
    if len(values) != len(_listed(wanted)) or not values:
        return None
    wanted_text = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    qualifier, _, base = operator.rpartition(":")
    if base.endswith("IfExists"):
        base = base.removesuffix("IfExists")
        if actual is None:
            return base in _STRING_OPERATORS
    if base == "Null" and not qualifier:
        return any((actual is None) == (v.lower() == "true") for v in wanted_text)
    if base not in _STRING_OPERATORS or qualifier not in ("", "ForAnyValue", "ForAllValues"):
        return None
    compare, negated = _STRING_OPERATORS[base]
    present = [] if actual is None else [actual]  # every key here is single-valued

    def matches(value: str) -> bool:
        found = any(compare(value, w) for w in wanted_text)
        return not found if negated else found

    if qualifier == "ForAnyValue":
        return any(matches(v) for v in present)  # an absent key: no value matches
    if qualifier == "ForAllValues":
        return all(matches(v) for v in present)  # an absent key: vacuously true
    if actual is None:
        return negated  # AWS: a missing key fails every operator but the negated ones
    return matches(actual)


def conditions_hold(conditions: Any, context: Context) -> bool | None:
    """All of a statement's conditions hold (True), one does not (False), or one cannot be
    evaluated and none is known false (None)."""
    if not conditions:
        return True
    if not isinstance(conditions, dict):
        return None
    outcome: bool | None = True
    for operator, pairs in conditions.items():
        if not isinstance(pairs, dict) or not pairs:
            outcome = None
            continue
        for key, wanted in pairs.items():
            holds = _condition_holds(str(operator), str(key), wanted, context)
            if holds is False:
                return False
            if holds is None:
                outcome = None
    return outcome


def allows(document: Mapping[str, Any], caller_arn: str, action: str, context: Context) -> bool:
    """True when `document` lets `caller_arn` do `action` in `context`: an Allow matches and no
    Deny does. A condition that cannot be evaluated keeps an Allow from granting and makes a
    Deny deny."""
    allowed = False
    for statement in _listed(document.get("Statement", [])):
        if not isinstance(statement, dict) or not _applies_to(statement, caller_arn, action):
            continue
        holds = conditions_hold(statement.get("Condition"), context)
        effect = statement.get("Effect")
        if effect == "Deny" and holds is not False:
            return False
        if effect == "Allow" and holds is True:
            allowed = True
    return allowed


def admits_only(document: Mapping[str, Any], principal: str, external_id: str) -> str | None:
    """None when every statement of the trust policy that allows anything lets in `principal`
    alone, and only with exactly `external_id` (StringEquals, one value); otherwise what is
    wrong and what to change, in words for the customer. Deny statements only take away."""
    problem = _first_problem(document, principal, external_id)
    if problem is None:
        return None
    return (
        f"{problem}. The trust policy must let in {principal} alone, with exactly the condition "
        f'"StringEquals": {{"sts:ExternalId": "{external_id}"}} (the broker\'s template does)'
    )


def _first_problem(document: Mapping[str, Any], principal: str, external_id: str) -> str | None:
    admitted = False
    for number, statement in enumerate(_listed(document.get("Statement", [])), start=1):
        if not isinstance(statement, dict):
            return f"statement {number} of the trust policy is not an object"
        name = f"statement {statement.get('Sid') or number}"
        effect = statement.get("Effect")
        if effect == "Deny":
            continue
        if effect != "Allow":
            return f"{name} has Effect {effect!r}; only Allow and Deny are understood"
        if "NotPrincipal" in statement or "NotAction" in statement:
            return f"{name} uses NotPrincipal or NotAction, which admit what they do not name"
        others = _other_principals(statement.get("Principal"), principal)
        if others:
            return (
                f"{name} lets in {', '.join(others)} besides the broker: anyone there who learns "
                "the external ID (it is not a secret) could assume the role"
            )
        problem = _external_id_problem(statement.get("Condition"), external_id)
        if problem:
            return f"{name} {problem}"
        admitted = True
    return None if admitted else "no statement lets the broker assume the role"


def _other_principals(value: Any, principal: str) -> list[str]:
    """The principals `value` (a statement's Principal) names besides `principal`."""
    if not isinstance(value, dict):
        return [repr(value)]
    others = [f"{kind} principals" for kind in value if kind != "AWS"]
    for named in _listed(value.get("AWS", [])):
        if named != principal and (
            not isinstance(named, str)
            or _role_of(named) is None
            or _role_of(named) != _role_of(principal)
        ):
            others.append(repr(named))
    return others


def _external_id_problem(conditions: Any, external_id: str) -> str | None:
    """Why `conditions` do not pin sts:ExternalId to exactly `external_id`, or None."""
    if not isinstance(conditions, dict):
        return "does not require the external ID"
    pins = [
        (str(operator), wanted)
        for operator, pairs in conditions.items()
        if isinstance(pairs, dict)
        for key, wanted in pairs.items()
        if str(key).lower() == EXTERNAL_ID_KEY
    ]
    if not pins:
        return "does not require the external ID"
    if len(pins) > 1:
        return "names sts:ExternalId in more than one condition"
    operator, wanted = pins[0]
    if operator != "StringEquals":
        return f"tests sts:ExternalId with {operator}, which admits other external IDs (or none)"
    values = _listed(wanted)
    if len(values) != 1:
        return f"allows {len(values)} external IDs"
    if values[0] != external_id:
        return f"requires the external ID {values[0]!r}, not this connection's"
    return None
