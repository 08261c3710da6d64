"""The trust-policy evaluator that the local emulator enforces with, and the read-back that
VerifyRole applies. The emulator and the read-back share this module, so a blind spot here would
hide in both: each row is an outcome AWS documents (IAM User Guide, "IAM JSON policy elements:
Condition operators" and "Principal"), not what the code happens to do."""

from __future__ import annotations

from typing import Any

import pytest

from broker.trust import admits_only, allows

US = "arn:aws:iam::111111111111:role/broker"
US_WITH_PATH = "arn:aws:iam::111111111111:role/platform/broker"
SESSION = "arn:aws:sts::111111111111:assumed-role/broker/session-1"
NEIGHBOUR = "arn:aws:iam::111111111111:role/another-service"  # same account, not the broker
STRANGER = "arn:aws:iam::999999999999:role/attacker"
EXTERNAL_ID = "0123456789abcdef0123456789abcdef"
OTHER_ID = "fedcba9876543210fedcba9876543210"


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(principal: Any, action: Any = "sts:AssumeRole", condition: Any = None) -> dict[str, Any]:
    statement = {"Effect": "Allow", "Principal": principal, "Action": action}
    if condition is not None:
        statement["Condition"] = condition
    return statement


def on_id(operator: str, value: Any) -> dict[str, Any]:
    return {operator: {"sts:ExternalId": value}}


WITH_ID = on_id("StringEquals", EXTERNAL_ID)
OURS = policy(allow({"AWS": US}, condition=WITH_ID))
NO_ID: dict[str, str | None] = {"sts:ExternalId": None}
RIGHT_ID = {"sts:ExternalId": EXTERNAL_ID}
WRONG_ID = {"sts:ExternalId": OTHER_ID}


@pytest.mark.parametrize(
    ("document", "caller", "context", "expected"),
    [
        # StringEquals: exact, case-sensitive; a missing key never matches.
        (OURS, US, RIGHT_ID, True),
        (OURS, US, NO_ID, False),
        (OURS, US, WRONG_ID, False),
        (OURS, US, {"sts:ExternalId": EXTERNAL_ID.upper()}, False),
        (OURS, SESSION, RIGHT_ID, True),  # a session of the trusted role is that role
        # Condition keys compare case-insensitively.
        (
            policy(allow({"AWS": US}, condition={"StringEquals": {"STS:EXTERNALID": EXTERNAL_ID}})),
            US,
            RIGHT_ID,
            True,
        ),
        # Several values of one key: any of them.
        (
            policy(allow({"AWS": US}, condition=on_id("StringEquals", [OTHER_ID, EXTERNAL_ID]))),
            US,
            RIGHT_ID,
            True,
        ),
        # StringLike: * and ? are wildcards; every other character is literal.
        (policy(allow({"AWS": US}, condition=on_id("StringLike", "*"))), US, WRONG_ID, True),
        (policy(allow({"AWS": US}, condition=on_id("StringLike", "*"))), US, NO_ID, False),
        (policy(allow({"AWS": US}, condition=on_id("StringLike", "0123*"))), US, RIGHT_ID, True),
        (
            policy(allow({"AWS": US}, condition=on_id("StringLike", "[0-9]*"))),
            US,
            RIGHT_ID,
            False,
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("StringLike", "0123456789abcdef?" * 2))),
            US,
            RIGHT_ID,
            False,
        ),
        # StringNotEquals: true for any other value, and for a missing key (negated operators).
        (policy(allow({"AWS": US}, condition=on_id("StringNotEquals", "x"))), US, WRONG_ID, True),
        (policy(allow({"AWS": US}, condition=on_id("StringNotEquals", "x"))), US, NO_ID, True),
        (
            policy(allow({"AWS": US}, condition=on_id("StringNotEquals", EXTERNAL_ID))),
            US,
            RIGHT_ID,
            False,
        ),
        # Null: "false" means present (any value), "true" means absent.
        (policy(allow({"AWS": US}, condition=on_id("Null", "false"))), US, WRONG_ID, True),
        (policy(allow({"AWS": US}, condition=on_id("Null", "false"))), US, NO_ID, False),
        (policy(allow({"AWS": US}, condition=on_id("Null", "true"))), US, NO_ID, True),
        (policy(allow({"AWS": US}, condition=on_id("Null", False))), US, WRONG_ID, True),
        # ...IfExists: true when the key is missing, else the operator itself.
        (
            policy(allow({"AWS": US}, condition=on_id("StringEqualsIfExists", EXTERNAL_ID))),
            US,
            NO_ID,
            True,
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("StringEqualsIfExists", EXTERNAL_ID))),
            US,
            WRONG_ID,
            False,
        ),
        # ForAnyValue: false for a missing key; ForAllValues: true for a missing key.
        (
            policy(allow({"AWS": US}, condition=on_id("ForAnyValue:StringEquals", EXTERNAL_ID))),
            US,
            RIGHT_ID,
            True,
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("ForAnyValue:StringEquals", EXTERNAL_ID))),
            US,
            NO_ID,
            False,
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("ForAllValues:StringEquals", EXTERNAL_ID))),
            US,
            NO_ID,
            True,
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("ForAllValues:StringEquals", EXTERNAL_ID))),
            US,
            WRONG_ID,
            False,
        ),
        # StringEqualsIgnoreCase.
        (
            policy(allow({"AWS": US}, condition=on_id("StringEqualsIgnoreCase", EXTERNAL_ID))),
            US,
            {"sts:ExternalId": EXTERNAL_ID.upper()},
            True,
        ),
        # Principals: "*", {"AWS": "*"}, an account (id or root ARN), a role ARN.
        (policy(allow("*")), STRANGER, {}, True),
        (policy(allow({"AWS": "*"})), STRANGER, {}, True),
        (policy(allow({"AWS": "111111111111"})), SESSION, {}, True),
        (policy(allow({"AWS": "arn:aws:iam::111111111111:root"})), NEIGHBOUR, {}, True),
        (policy(allow({"AWS": "arn:aws:iam::999999999999:root"})), US, {}, False),
        (policy(allow({"AWS": US})), NEIGHBOUR, {}, False),
        (policy(allow({"AWS": US_WITH_PATH})), US, {}, True),  # one role name per account
        (policy(allow({"AWS": [US]}, action="sts:*")), US, {}, True),
        (policy(allow({"AWS": [US]}, action="sts:Assume*")), US, {}, True),
        (policy(allow({"AWS": [US]}, action="sts:TagSession")), US, {}, False),
        (policy(allow({"Service": "ec2.amazonaws.com"})), US, {}, False),
        # NotPrincipal / NotAction: everything but what they name.
        (
            policy({"Effect": "Allow", "NotPrincipal": {"AWS": STRANGER}, "Action": "sts:*"}),
            US,
            {},
            True,
        ),
        (policy({"Effect": "Allow", "Principal": "*", "NotAction": "iam:*"}), US, {}, True),
        # An explicit Deny wins over any Allow.
        (
            policy(allow({"AWS": US}), {"Effect": "Deny", "Principal": "*", "Action": "*"}),
            US,
            {},
            False,
        ),
        # What cannot be evaluated never grants, and always denies.
        (
            policy(allow({"AWS": US}, condition={"NumericLessThan": {"x": "1"}})),
            US,
            {"x": "0"},
            False,
        ),
        (
            policy(
                allow({"AWS": US}),
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "*",
                    "Condition": {"DateGreaterThan": {"aws:CurrentTime": "2020-01-01"}},
                },
            ),
            US,
            {},
            False,
        ),
        (policy(allow({"AWS": US}, condition={"StringEquals": "oops"})), US, RIGHT_ID, False),
        (policy(allow({"AWS": US}, condition=on_id("StringEquals", []))), US, RIGHT_ID, False),
    ],
)
def test_allows(
    document: dict[str, Any], caller: str, context: dict[str, Any], expected: bool
) -> None:
    assert allows(document, caller, "sts:AssumeRole", context) is expected


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        # Only the broker, only this external ID: what the template makes.
        (OURS, None),
        (policy(allow({"AWS": [US]}, condition=WITH_ID)), None),
        (policy(allow({"AWS": US}, condition=on_id("StringEquals", [EXTERNAL_ID]))), None),
        # Extra conditions only narrow; Deny statements only take away.
        (
            policy(
                allow(
                    {"AWS": US},
                    condition=WITH_ID | {"StringLike": {"sts:RoleSessionName": "run-*"}},
                ),
                {"Effect": "Deny", "Principal": "*", "Action": "sts:AssumeRole"} | {"Sid": "x"},
            ),
            None,
        ),
        # Wildcards and operators that admit other external IDs, or none.
        (policy(allow({"AWS": US})), "does not require the external ID"),
        (policy(allow({"AWS": US}, condition={})), "does not require the external ID"),
        (policy(allow({"AWS": US}, condition=on_id("StringLike", "*"))), "StringLike"),
        (policy(allow({"AWS": US}, condition=on_id("StringLike", EXTERNAL_ID))), "StringLike"),
        (policy(allow({"AWS": US}, condition=on_id("StringNotEquals", "x"))), "StringNotEquals"),
        (policy(allow({"AWS": US}, condition=on_id("Null", "false"))), "Null"),
        (
            policy(allow({"AWS": US}, condition=on_id("ForAnyValue:StringEquals", EXTERNAL_ID))),
            "ForAnyValue:StringEquals",
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("StringEqualsIfExists", EXTERNAL_ID))),
            "StringEqualsIfExists",
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("StringEqualsIgnoreCase", EXTERNAL_ID))),
            "StringEqualsIgnoreCase",
        ),
        (
            policy(allow({"AWS": US}, condition=on_id("StringEquals", [EXTERNAL_ID, OTHER_ID]))),
            "allows 2 external IDs",
        ),
        (policy(allow({"AWS": US}, condition=on_id("StringEquals", []))), "allows 0"),
        (policy(allow({"AWS": US}, condition=on_id("StringEquals", OTHER_ID))), OTHER_ID),
        (
            policy(
                allow(
                    {"AWS": US},
                    condition={"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}
                    | {"StringLike": {"STS:ExternalID": "*"}},
                )
            ),
            "more than one condition",
        ),
        # A second statement that admits the broker more loosely.
        (
            policy(
                allow({"AWS": US}, condition=WITH_ID), allow({"AWS": US}, action="sts:AssumeRole")
            ),
            "does not require the external ID",
        ),
        # Any principal but ours, with or without the right external ID.
        (policy(allow("*", condition=WITH_ID)), "'*'"),
        (policy(allow({"AWS": "*"}, condition=WITH_ID)), "'*'"),
        (policy(allow({"AWS": [US, "*"]}, condition=WITH_ID)), "'*'"),
        (policy(allow({"AWS": "111111111111"}, condition=WITH_ID)), "111111111111"),
        (
            policy(allow({"AWS": "arn:aws:iam::111111111111:root"}, condition=WITH_ID)),
            "arn:aws:iam::111111111111:root",
        ),
        (policy(allow({"AWS": [US, STRANGER]}, condition=WITH_ID)), STRANGER),
        (policy(allow({"AWS": NEIGHBOUR}, condition=WITH_ID)), NEIGHBOUR),
        (
            policy(allow({"AWS": US.replace(":aws:", ":aws-cn:")}, condition=WITH_ID)),
            "arn:aws-cn:iam::111111111111:role/broker",
        ),
        (
            policy(allow({"AWS": US, "Service": "ec2.amazonaws.com"}, condition=WITH_ID)),
            "Service principals",
        ),
        (
            policy(
                allow({"AWS": US}, condition=WITH_ID),
                allow({"Federated": "arn:aws:iam::111111111111:oidc-provider/x"}),
            ),
            "Federated principals",
        ),
        (policy(allow({"AWS": 111111111111}, condition=WITH_ID)), "111111111111"),
        (
            policy({"Effect": "Allow", "NotPrincipal": {"AWS": STRANGER}, "Action": "sts:*"}),
            "NotPrincipal",
        ),
        (
            policy({"Effect": "Allow", "Principal": {"AWS": US}, "NotAction": "iam:*"}),
            "NotAction",
        ),
        # Malformed, or nothing that lets the broker in.
        (policy(), "no statement lets"),
        ({"Statement": "Allow everything"}, "not an object"),
        (policy(allow({"AWS": US}, condition=WITH_ID) | {"Effect": "allow"}), "Effect"),
        (policy({"Effect": "Deny", "Principal": "*", "Action": "*"}), "no statement lets"),
    ],
)
def test_admits_only_the_broker_with_exactly_this_external_id(
    document: dict[str, Any], problem: str | None
) -> None:
    found = admits_only(document, US, EXTERNAL_ID)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
        assert EXTERNAL_ID in found, "the detail says what to change"


def test_a_role_with_a_path_is_the_same_broker() -> None:
    """IAM role names are unique per account, so a principal with the role's path names it."""
    assert (
        admits_only(policy(allow({"AWS": US_WITH_PATH}, condition=WITH_ID)), US, EXTERNAL_ID)
        is None
    )
