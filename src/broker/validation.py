"""Request fields: each malformed one is InvalidArgument naming the field and its form."""

from __future__ import annotations

import re
from collections.abc import Callable

from broker.errors import InvalidArgument

_FORMS = {
    "tenant_id": (
        re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII),
        "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
    ),
    "run_id": (
        re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=+@-]{0,127}", re.ASCII),
        "1-128 characters of A-Z a-z 0-9 . _ : / = + @ -, starting with a letter or digit",
    ),
    "region": (
        re.compile(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}", re.ASCII),
        "an AWS region such as us-east-1 (or empty for the broker's region)",
    ),
    "role_arn": (
        re.compile(
            r"arn:(aws|aws-cn|aws-us-gov):iam::[0-9]{12}:role/([A-Za-z0-9+=,.@_-]+/)*"
            r"[A-Za-z0-9+=,.@_-]{1,64}",
            re.ASCII,
        ),
        "an IAM role ARN: arn:{aws,aws-cn,aws-us-gov}:iam::<12 digits>:role/[path/]name",
    ),
}
_MAX_ARN = 2048


def valid(name: str) -> Callable[[str], re.Match[str] | None]:
    """The test that `value` has the form of field `name` (a fullmatch), for code that must
    tell a valid field from one to be treated as untrusted without raising."""
    return _FORMS[name][0].fullmatch


def field(name: str, value: str, *, optional: bool = False) -> str:
    """`value` if it has the form of field `name`; raises InvalidArgument otherwise."""
    pattern, form = _FORMS[name]
    if not value:
        if optional:
            return value
        raise InvalidArgument(name, f"is required: {form}")
    if len(value) > _MAX_ARN or not pattern.fullmatch(value):
        raise InvalidArgument(name, f"must be {form}")
    return value
