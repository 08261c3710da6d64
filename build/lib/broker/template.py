"""The customer's CloudFormation template and the quick-create link that opens it in the console."""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import quote, urlencode

STACK_NAME_PREFIX = "credential-broker-"


def template_body() -> str:
    """The template CreateConnection's link points to (deploy/cloudformation/customer-role.yaml)."""
    return (resources.files("broker") / "customer-role.yaml").read_text(encoding="utf-8")


def stack_name(tenant_id: str) -> str:
    """A valid stack name ([A-Za-z][-A-Za-z0-9]*, ≤ 128) that tells the customer what it is."""
    return (STACK_NAME_PREFIX + re.sub(r"[^A-Za-z0-9-]", "-", tenant_id))[:128]


def console_host(region: str) -> str:
    if region.startswith("cn-"):
        return "console.amazonaws.cn"
    if region.startswith("us-gov-"):
        return "console.amazonaws-us-gov.com"
    return "console.aws.amazon.com"


def quick_create_url(
    *, template_url: str, region: str, tenant_id: str, external_id: str, trusted_principal_arn: str
) -> str:
    """The console link that creates the customer's stack with every parameter filled in."""
    query = urlencode(
        {
            "templateURL": template_url,
            "stackName": stack_name(tenant_id),
            "param_ExternalId": external_id,
            "param_TrustedPrincipalArn": trusted_principal_arn,
        },
        quote_via=quote,
    )
    return (
        f"https://{console_host(region)}/cloudformation/home?region={region}"
        f"#/stacks/quickcreate?{query}"
    )
