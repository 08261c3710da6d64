"""The customer's CloudFormation template and the quick-create link that opens it in the console.

The template is rendered per deployment with the broker's principal built in: a quick-create
link is a URL anyone can edit, so nothing in it decides whom the customer's role trusts. The link
carries only the stack name and the connection's external ID.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from urllib.parse import quote, urlencode

STACK_NAME_PREFIX = "credential-broker-"
# CloudFormation names the role `<stack name>-BrokerReadOnlyRole-<12 or 13 random characters>`
# (the template gives it no RoleName), and IAM allows 64: stack names stay within 31, so the
# whole stack name is in the role's name, uncut.
STACK_NAME_MAX = 64 - len("-BrokerReadOnlyRole-") - 13
# Hex digits of the external ID's SHA-256 that end the stack name (one connection's stack).
STACK_SUFFIX_LENGTH = 6
# The MaxSessionDuration of the role customer-role.yaml creates: no session can be longer.
ROLE_MAX_SESSION_DURATION = 3600
# Where the packaged template names the principal; `template_body` puts the ARN there.
PRINCIPAL_PLACEHOLDER = "{{TrustedPrincipalArn}}"
# An IAM role or user (with its path), in a partition the broker supports. Names and path
# segments use IAM's name characters only: no wildcard, no quote, no account root.
PRINCIPAL_ARN = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):iam::[0-9]{12}:(role|user)/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}",
    re.ASCII,
)


def check_principal(arn: str) -> str:
    """`arn` if customers' roles may trust it; ValueError saying what is wrong otherwise."""
    if not PRINCIPAL_ARN.fullmatch(arn):
        raise ValueError(
            f"{arn!r} is not an IAM role or user ARN "
            "(arn:aws|aws-cn|aws-us-gov:iam::<12 digits>:role/[path/]name, or user/): customers' "
            "roles trust exactly this principal, so no wildcard and no account root"
        )
    return arn


def template_body(trusted_principal_arn: str) -> str:
    """The customer's template, trusting `trusted_principal_arn` (validated) and nobody else.
    deploy/cloudformation/customer-role.yaml is this for an example principal."""
    source = (resources.files("broker") / "customer-role.yaml").read_text(encoding="utf-8")
    return source.replace(PRINCIPAL_PLACEHOLDER, check_principal(trusted_principal_arn))


def stack_name(tenant_id: str, external_id: str) -> str:
    """The name of one connection's stack: `credential-broker-<tenant, shortened>-<6 hex>`.

    Valid for any tenant id (`[A-Za-z][-A-Za-z0-9]*`, at most STACK_NAME_MAX characters). The
    suffix comes from the external ID, which is not secret and is new for every connection: a
    customer who connects again without deleting the old stack gets a new name (CloudFormation
    refuses an existing one), and nothing more is stored."""
    suffix = hashlib.sha256(external_id.encode()).hexdigest()[:STACK_SUFFIX_LENGTH]
    room = STACK_NAME_MAX - len(STACK_NAME_PREFIX) - len(suffix) - 1
    tenant = re.sub(r"[^A-Za-z0-9]+", "-", tenant_id)[:room].strip("-")
    return f"{STACK_NAME_PREFIX}{tenant}-{suffix}" if tenant else STACK_NAME_PREFIX + suffix


def console_host(region: str) -> str:
    if region.startswith("cn-"):
        return "console.amazonaws.cn"
    if region.startswith("us-gov-"):
        return "console.amazonaws-us-gov.com"
    return "console.aws.amazon.com"


def quick_create_url(*, template_url: str, region: str, tenant_id: str, external_id: str) -> str:
    """The console link that creates the customer's stack with its one parameter filled in."""
    query = urlencode(
        {
            "templateURL": template_url,
            "stackName": stack_name(tenant_id, external_id),
            "param_ExternalId": external_id,
        },
        quote_via=quote,
    )
    return (
        f"https://{console_host(region)}/cloudformation/home?region={region}"
        f"#/stacks/quickcreate?{query}"
    )
