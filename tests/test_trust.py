"""The trust-policy evaluator that VerifyRole and the local emulator share."""

from __future__ import annotations

from typing import Any

import pytest

from broker.trust import allows, requires_external_id

US = "arn:aws:iam::111111111111:role/broker"
SESSION = "arn:aws:sts::111111111111:assumed-role/broker/session-1"
EXTERNAL_ID = "0123456789abcdef0123456789abcdef"


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(principal: Any, action: Any = "sts:AssumeRole", condition: Any = None) -> dict[str, Any]:
    statement = {"Effect": "Allow", "Principal": principal, "Action": action}
    if condition is not None:
        statement["Condition"] = condition
    return statement


WITH_ID = {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}


@pytest.mark.parametrize(
    ("document", "caller", "context", "expected"),
    [
        (policy(allow({"AWS": US}, condition=WITH_ID)), US, {"sts:ExternalId": EXTERNAL_ID}, True),
        (policy(allow({"AWS": US}, condition=WITH_ID)), US, {"sts:ExternalId": None}, False),
        (policy(allow({"AWS": US}, condition=WITH_ID)), US, {"sts:ExternalId": "other"}, False),
        (
            policy(allow({"AWS": US}, condition=WITH_ID)),
            SESSION,
            {"sts:ExternalId": EXTERNAL_ID},
            True,
        ),
        (policy(allow({"AWS": "111111111111"})), SESSION, {}, True),
        (policy(allow({"AWS": "arn:aws:iam::111111111111:root"})), US, {}, True),
        (policy(allow({"AWS": "arn:aws:iam::999999999999:root"})), US, {}, False),
        (policy(allow({"AWS": [US]}, action="sts:*")), US, {}, True),
        (policy(allow({"Service": "ec2.amazonaws.com"})), US, {}, False),
        (policy(allow("*")), US, {}, True),
        (
            policy(allow({"AWS": US}), {"Effect": "Deny", "Principal": "*", "Action": "*"}),
            US,
            {},
            False,
        ),
        (
            policy(allow({"AWS": US}, condition={"StringLike": {"sts:ExternalId": "0123*"}})),
            US,
            {"sts:ExternalId": EXTERNAL_ID},
            True,
        ),
        (
            policy(allow({"AWS": US}, condition={"NumericLessThan": {"x": "1"}})),
            US,
            {"x": "0"},
            False,
        ),
        (
            policy(allow({"AWS": US}, condition={"Null": {"sts:ExternalId": "false"}})),
            US,
            {"sts:ExternalId": None},
            False,
        ),
    ],
)
def test_allows(
    document: dict[str, Any], caller: str, context: dict[str, Any], expected: bool
) -> None:
    assert allows(document, caller, "sts:AssumeRole", context) is expected


def test_requires_external_id_names_the_fix() -> None:
    assert (
        requires_external_id(policy(allow({"AWS": US}, condition=WITH_ID)), US, EXTERNAL_ID) is None
    )
    open_policy = requires_external_id(policy(allow({"AWS": US})), US, EXTERNAL_ID)
    assert open_policy is not None
    assert "without an external ID" in open_policy
    assert EXTERNAL_ID in open_policy
    wrong = {"StringEquals": {"sts:ExternalId": "x" * 32}}
    assert "does not let" in (
        requires_external_id(policy(allow({"AWS": US}, condition=wrong)), US, EXTERNAL_ID) or ""
    )
