"""A small evaluator for IAM role trust policies: enough to say whether a principal may assume a
role, given the request's condition keys. VerifyRole uses it to read back the customer's trust
policy; the local AWS emulator uses it to enforce trust policies as AWS does (moto does not).

It understands Allow/Deny, Action (with wildcards), Principal {"AWS": ...} by ARN, account or
"*", and the condition operators StringEquals, StringLike, StringEqualsIgnoreCase, StringNotEquals
and Null. Anything else fails closed: an unknown operator never grants access.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

Context = Mapping[str, str | None]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _account_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[4] if len(parts) > 4 else ""


def _role_of(arn: str) -> str | None:
    """`account/role-name` for a role ARN (any path) or an assumed-role session ARN."""
    parts = arn.split(":", 5)
    if len(parts) != 6:
        return None
    resource = parts[5]
    if parts[2] == "iam" and resource.startswith("role/"):
        return f"{parts[4]}/{resource.rsplit('/', 1)[-1]}"
    if parts[2] == "sts" and resource.startswith("assumed-role/"):
        return f"{parts[4]}/{resource.split('/')[1]}"
    return None


def principal_matches(principal: Any, caller_arn: str) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict):
        return False
    for value in _listed(principal.get("AWS", [])):
        if not isinstance(value, str):
            continue
        if value in ("*", caller_arn):
            return True
        whole_account = value.isdigit() or value.endswith(":root")
        if whole_account and _account_of(caller_arn) in (value, _account_of(value)):
            return True
        role = _role_of(value)
        if role is not None and role == _role_of(caller_arn):
            return True
    return False


def action_matches(statement: Mapping[str, Any], action: str) -> bool:
    return any(
        fnmatchcase(action.lower(), str(pattern).lower())
        for pattern in _listed(statement.get("Action", []))
    )


def _condition_holds(operator: str, key: str, wanted: Any, context: Context) -> bool:
    actual = {k.lower(): v for k, v in context.items()}.get(key.lower())
    values = [str(v) for v in _listed(wanted)]
    if operator == "Null":
        return (actual is None) == (values[0].lower() == "true")
    if actual is None:
        return operator == "StringNotEquals"
    if operator == "StringEquals":
        return actual in values
    if operator == "StringNotEquals":
        return actual not in values
    if operator == "StringEqualsIgnoreCase":
        return actual.lower() in (v.lower() for v in values)
    if operator == "StringLike":
        return any(fnmatchcase(actual, v) for v in values)
    return False


def conditions_hold(conditions: Mapping[str, Any], context: Context) -> bool:
    return all(
        _condition_holds(operator, key, wanted, context)
        for operator, pairs in conditions.items()
        for key, wanted in (pairs or {}).items()
    )


def allows(document: Mapping[str, Any], caller_arn: str, action: str, context: Context) -> bool:
    """True when `document` lets `caller_arn` do `action` in `context`: an Allow matches and no
    Deny does."""
    allowed = False
    for statement in _listed(document.get("Statement", [])):
        if not isinstance(statement, dict):
            continue
        if not (
            principal_matches(statement.get("Principal"), caller_arn)
            and action_matches(statement, action)
            and conditions_hold(statement.get("Condition", {}), context)
        ):
            continue
        if statement.get("Effect") == "Deny":
            return False
        allowed = allowed or statement.get("Effect") == "Allow"
    return allowed


def requires_external_id(
    document: Mapping[str, Any], principal: str, external_id: str
) -> str | None:
    """None when the trust policy lets `principal` assume the role with `external_id` and not
    without it; otherwise what is wrong, in words for the customer."""
    if allows(document, principal, "sts:AssumeRole", {"sts:ExternalId": None}):
        return (
            f"the trust policy lets {principal} assume the role without an external ID; add the "
            f'condition "StringEquals": {{"sts:ExternalId": "{external_id}"}}'
        )
    if not allows(document, principal, "sts:AssumeRole", {"sts:ExternalId": external_id}):
        return (
            f"the trust policy does not let {principal} assume the role with external ID "
            f"{external_id}"
        )
    return None
