"""A local AWS emulator for development and tests: moto in server mode on loopback, with the
one thing moto leaves out that the broker's security rests on: STS enforcing role trust policies.

moto's own STS lets anyone assume any role, with or without an external ID, even a role that does
not exist. `TrustEnforcingSts` sits in front of it and, like AWS, answers AccessDenied unless the
role exists, its trust policy allows the caller sts:AssumeRole under the request's conditions
(sts:ExternalId), and also sts:TagSession / sts:SetSourceIdentity when those are asked for; it
refuses a DurationSeconds above the role's MaxSessionDuration, and echoes SourceIdentity.
Every AssumeRole it sees is recorded (no secrets are in a request) for tests to inspect.

It can also serve STS regions on endpoints of their own (`LocalAws(regions=…)`, or
`serve_region`), each on its own loopback port in front of the same moto (sessions from any
region are valid everywhere, as AWS's are), each answering only requests signed for its region,
and each able to go down (connections refused), hang (requests taken, never answered) and come
back: `local_aws.regions["us-east-1"].down()`. Under `broker dev` the same is asked over HTTP:
`POST /_emulator/regions/<region>/<down|hang|up>` on the main endpoint.

Requires the `dev` extra (moto, boto3). Never point a production broker at it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import yaml  # type: ignore[import-untyped]  # PyYAML comes with moto[server], untyped
from moto.iam.models import get_account_id_from, iam_backends
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.sts.models import sts_backends
from werkzeug.serving import BaseWSGIServer, make_server

from broker.config import is_loopback
from broker.template import template_body
from broker.trust import allows

PLATFORM_ACCOUNT = "111111111111"
CUSTOMER_ACCOUNT = "222222222222"
TEMPLATE_BUCKET = "credential-broker-templates"
TEMPLATE_KEY = "customer-role.yaml"
ROLE_CHAINING_CAP = 3600
AWS_MAX_SESSION_DURATION = 43200  # what AWS allows a role's MaxSessionDuration at most
_CREDENTIAL_SCOPE = re.compile(r"Credential=([^/]+)/[^/]+/([^/]+)/([^/]+)/")
REGION_KEY = "emulator.region"  # the WSGI environ key naming the regional endpoint asked
HANG_LIMIT = 60.0  # seconds a hung endpoint holds a request at most before answering 503
_CONTROL = re.compile(r"/_emulator/regions/([a-z0-9-]{1,32})/(down|hang|up)")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class AssumeRoleCall:
    """One sts:AssumeRole the emulator answered (or refused)."""

    caller_arn: str
    role_arn: str
    session_name: str
    external_id: str | None
    source_identity: str | None
    duration: int
    tags: dict[str, str]
    policy_arns: list[str]
    allowed: bool
    region: str = ""  # the regional endpoint that was asked ("" for the main one)


@dataclass
class TrustEnforcingSts:
    """WSGI middleware in front of moto: enforces trust policies on sts:AssumeRole."""

    app: WsgiApp
    # Hand out credentials that expire after this many seconds, whatever was asked (tests).
    session_lifetime: float | None = None
    # Like IAM's eventual consistency: a role younger than this is not assumable yet.
    propagation_delay: float = 0.0
    # Seconds every AssumeRole answer is held back (a slow STS).
    latency: float = 0.0
    calls: list[AssumeRoleCall] = field(default_factory=list)
    # AssumeRole answers being worked on now, and the most at once (reset it to measure).
    in_flight: int = 0
    most_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        if environ.get("REQUEST_METHOD") != "POST" or not scope or scope.group(3) != "sts":
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if params.get("Action") != "AssumeRole":
            return self.app(environ, start_response)
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            refusal = self._judge(scope.group(1), params, environ.get(REGION_KEY, ""))
            if refusal is not None:
                status, code, message = refusal
                return _error(start_response, status, code, message)
            return self._rewrite(environ, start_response, params)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _judge(
        self, access_key: str, params: dict[str, str], region: str
    ) -> tuple[str, str, str] | None:
        account = get_account_id_from(access_key)
        _, caller_arn, _ = sts_backends[account]["aws"].get_caller_identity(access_key, "us-east-1")
        role_arn = params.get("RoleArn", "")
        tags = {
            params[k]: params.get(k.replace(".Key", ".Value"), "")
            for k in params
            if k.startswith("Tags.member.") and k.endswith(".Key")
        }
        call = AssumeRoleCall(
            caller_arn=caller_arn,
            role_arn=role_arn,
            session_name=params.get("RoleSessionName", ""),
            external_id=params.get("ExternalId"),
            source_identity=params.get("SourceIdentity"),
            duration=int(params.get("DurationSeconds", "3600")),
            tags=tags,
            policy_arns=[
                v for k, v in params.items() if re.fullmatch(r"PolicyArns\.member\.\d+\.arn", k)
            ],
            allowed=False,
            region=region,
        )
        role = _find_role(role_arn)
        if role is not None and self.propagation_delay:
            age = (datetime.now(UTC) - role.create_date.replace(tzinfo=UTC)).total_seconds()
            role = role if age >= self.propagation_delay else None
        context = {"sts:ExternalId": call.external_id, "sts:SourceIdentity": call.source_identity}
        document = json.loads(unquote(role.assume_role_policy_document)) if role else {}
        wanted = ["sts:AssumeRole"]
        wanted += ["sts:TagSession"] if tags else []
        wanted += ["sts:SetSourceIdentity"] if call.source_identity else []
        refused = role is None or not all(
            allows(document, caller_arn, action, context) for action in wanted
        )
        if not refused:
            assert role is not None
            chained = ":assumed-role/" in caller_arn
            limit = min(
                role.max_session_duration,
                ROLE_CHAINING_CAP if chained else AWS_MAX_SESSION_DURATION,
            )
            if call.duration > limit:
                with self._lock:
                    self.calls.append(call)
                return (
                    "400 Bad Request",
                    "ValidationError",
                    "The requested DurationSeconds exceeds the MaxSessionDuration set for this "
                    "role."
                    if not chained
                    else "The requested DurationSeconds exceeds the 1 hour "
                    "session limit for roles assumed by role chaining.",
                )
        call.allowed = not refused
        with self._lock:
            self.calls.append(call)
        if refused:
            return (
                "403 Forbidden",
                "AccessDenied",
                f"User: {caller_arn} is not authorized to perform: sts:AssumeRole on resource: "
                f"{role_arn}",
            )
        return None

    def _rewrite(
        self, environ: dict[str, Any], start_response: Callable[..., Any], params: dict[str, str]
    ) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            captured["status"], captured["headers"] = status, headers

        body = b"".join(self.app(environ, keep))
        if self.session_lifetime is not None:
            expires = datetime.now(UTC) + timedelta(seconds=self.session_lifetime)
            stamp = expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
            body = re.sub(
                rb"<Expiration>[^<]*</Expiration>", b"<Expiration>" + stamp + b"</Expiration>", body
            )
        if params.get("SourceIdentity"):
            element = f"<SourceIdentity>{params['SourceIdentity']}</SourceIdentity>".encode()
            body = body.replace(b"</AssumedRoleUser>", b"</AssumedRoleUser>" + element, 1)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *_: Any) -> None:
        """One line per request on stderr is noise in tests and in `broker dev`."""


def _find_role(role_arn: str) -> Any:
    parts = role_arn.split(":")
    if len(parts) < 6 or not parts[4].isdigit():
        return None
    try:
        return iam_backends[parts[4]]["aws"].get_role_by_arn(role_arn)
    except Exception:  # moto's IAMNotFoundException and friends: no such role
        return None


def _error(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{_xml(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()
    start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class Identity:
    arn: str
    access_key_id: str
    secret_access_key: str = field(repr=False)


class EmulatorClient:
    """boto3 clients for an emulator at `endpoint_url`, and what a newcomer does with them."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url

    def client(self, service: str, account: str = PLATFORM_ACCOUNT, **credentials: str) -> Any:
        """A boto3 client for the emulator, acting in `account` (or as `credentials`)."""
        client = boto3.client(
            service,
            region_name="us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=credentials.get("aws_access_key_id", "testing"),
            aws_secret_access_key=credentials.get("aws_secret_access_key", "testing"),
            aws_session_token=credentials.get("aws_session_token"),
        )
        if not credentials:
            client.meta.events.register(
                "before-sign.*.*",
                lambda request, **_: request.headers.__setitem__("x-moto-account-id", account),
            )
        return client

    def create_user(self, name: str, account: str = PLATFORM_ACCOUNT) -> Identity:
        """An IAM user with an access key: the broker's own identity in the platform account."""
        iam = self.client("iam", account)
        arn = iam.create_user(UserName=name)["User"]["Arn"]
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Identity(arn, key["AccessKeyId"], key["SecretAccessKey"])

    def publish_template(self, trusted_principal_arn: str) -> str:
        """Put the customer template, rendered for `trusted_principal_arn`, in the emulator's S3
        (as an operator publishes `broker template`); returns its URL."""
        s3 = self.client("s3")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=TEMPLATE_BUCKET)
        body = template_body(trusted_principal_arn).encode()
        s3.put_object(Bucket=TEMPLATE_BUCKET, Key=TEMPLATE_KEY, Body=body)
        return f"{self.endpoint_url}/{TEMPLATE_BUCKET}/{TEMPLATE_KEY}"

    def fetch_template(self, template_url: str) -> str:
        """The template published at `template_url` in this emulator's S3: its path names the
        bucket and the key (`publish_template` makes such URLs). Its host may name this
        emulator by another address (`broker dev-stack --aws-endpoint`)."""
        split = urlsplit(template_url)
        bucket, _, key = split.path.removeprefix("/").partition("/")
        if split.scheme not in ("http", "https") or not bucket or not key:
            raise ValueError(f"{template_url!r} is not an object in an emulator's S3")
        obj = self.client("s3").get_object(Bucket=bucket, Key=key)
        return str(obj["Body"].read().decode("utf-8"))

    def create_customer_stack(self, quick_create_url: str, account: str = CUSTOMER_ACCOUNT) -> str:
        """Do what the customer's console does with a quick-create link: read the template at
        its templateURL, fill the parameters the template declares from the link's param_
        values (others are ignored; each value must meet its parameter's constraints), and
        create the stack in the customer's account. Returns the RoleArn output."""
        query = parse_qs(link_query(quick_create_url))
        body = self.fetch_template(query["templateURL"][0])
        parameters = []
        for name, declared in _declared_parameters(body).items():
            values = query.get(f"param_{name}")
            if values is None:
                continue  # the template's default, if any (CloudFormation refuses a missing one)
            _check_parameter(name, declared, values[0])
            parameters.append({"ParameterKey": name, "ParameterValue": values[0]})
        stack_name = query["stackName"][0]
        cloudformation = self.client("cloudformation", account)
        cloudformation.create_stack(
            StackName=stack_name,
            TemplateBody=body,
            Parameters=parameters,
            Capabilities=["CAPABILITY_IAM"],
        )
        stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
        if stack["StackStatus"] != "CREATE_COMPLETE":
            raise RuntimeError(f"stack {stack_name} is {stack['StackStatus']}")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        return str(outputs["RoleArn"])


def link_query(quick_create_url: str) -> str:
    """The query of a CloudFormation quick-create link (`…#/stacks/quickcreate?…`, naming at
    least templateURL and stackName); ValueError for anything else."""
    route, _, query = urlsplit(quick_create_url).fragment.partition("?")
    names = parse_qs(query)
    if not route.endswith("/stacks/quickcreate") or not {"templateURL", "stackName"} <= set(names):
        raise ValueError(
            "not a quick-create link (https://…/cloudformation/home?region=…#/stacks/quickcreate?"
            "templateURL=…&stackName=…): give CreateConnection's quick_create_url"
        )
    return query


def endpoint_of(quick_create_url: str) -> str | None:
    """The emulator a quick-create link's template is published in (as `broker dev` and the
    tests publish it, `http://<loopback>:<port>/<bucket>/<key>`): its `http://host:port`; None
    when the template is anywhere else (real S3, another machine)."""
    template_url = parse_qs(link_query(quick_create_url))["templateURL"][0]
    split = urlsplit(template_url)
    host = split.hostname
    if split.scheme != "http" or not host or not is_loopback(host):
        return None
    return f"http://{f'[{host}]' if ':' in host else host}:{split.port or 80}"


def _declared_parameters(template: str) -> dict[str, dict[str, Any]]:
    """The Parameters section of a YAML template (intrinsic-function tags read as null)."""

    loader: Any = type("TemplateLoader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda *_: None)
    parsed = yaml.load(template, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    return dict(parsed.get("Parameters") or {})


def _check_parameter(name: str, declared: dict[str, Any], value: str) -> None:
    """Refuse a value as CloudFormation does: AllowedPattern matches the whole value."""
    pattern = declared.get("AllowedPattern")
    too_short = len(value) < int(declared.get("MinLength", 0))
    too_long = len(value) > int(declared.get("MaxLength", len(value)))
    if too_short or too_long or (pattern is not None and not re.fullmatch(pattern, value)):
        raise ValueError(f"Parameter '{name}' must match pattern {pattern} (given {value!r})")


class RegionalEndpoint:
    """One STS region's endpoint on its own loopback port, in front of the shared emulator.

    It answers only requests signed for its region (AWS answers SignatureDoesNotMatch to
    others), marks each one with its region (`AssumeRoleCall.region`), and is in one of three
    modes, changed from any thread: `up()`, `down()` (connections refused: nothing listens on
    its port, which stays reserved; moto's answers close their connection, so none outlives
    it) or `hang()` (connections taken, requests held unanswered until `up()`, or HANG_LIMIT,
    then 503)."""

    def __init__(self, region: str, app: WsgiApp) -> None:
        self.region = region
        self.mode = "up"
        self._app = app
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        self._server, self._thread = self._serve(0)
        self.port: int = self._server.server_port
        self._reserved: socket.socket | None = None
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def _serve(self, port: int) -> tuple[BaseWSGIServer, threading.Thread]:
        server = make_server(
            "127.0.0.1", port, self._answer, threaded=True, request_handler=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server, thread

    def _answer(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self.mode == "hang":
            self._released.wait(HANG_LIMIT)
            return _error(start_response, "503 Service Unavailable", "ServiceUnavailable", "hung")
        scope = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        if scope and scope.group(3) == "sts" and scope.group(2) != self.region:
            return _error(
                start_response,
                "403 Forbidden",
                "SignatureDoesNotMatch",
                f"Credential should be scoped to a valid region, not '{scope.group(2)}'.",
            )
        environ[REGION_KEY] = self.region
        return self._app(environ, start_response)

    def down(self) -> None:
        """Refuse connections until `up()`."""
        with self._lock:
            if self.mode == "down":
                return
            self._stop_serving()
            # Bound but not listening: a connection is refused, and no one else takes the port.
            self._reserved = _reserve(self.port)
            self.mode = "down"
            self._released.set()

    def hang(self) -> None:
        """Take connections and requests, and answer none, until `up()`."""
        with self._lock:
            if self.mode == "down":
                self._bring_back()
            self._released.clear()
            self.mode = "hang"

    def up(self) -> None:
        """Answer again."""
        with self._lock:
            if self.mode == "down":
                self._bring_back()
            self.mode = "up"
            self._released.set()

    def stop(self) -> None:
        with self._lock:
            self._released.set()
            if self.mode == "down":
                assert self._reserved is not None
                self._reserved.close()
            else:
                self._stop_serving()

    def _stop_serving(self) -> None:
        self._server.shutdown()
        # Its thread closes the listening socket too: until it has, the port is not free.
        self._thread.join()
        self._server.server_close()

    def _bring_back(self) -> None:
        assert self._reserved is not None
        self._reserved.close()
        self._reserved = None
        self._server, self._thread = self._serve(self.port)


def _reserve(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` that does not listen. A listening socket just closed
    may hold the port for a moment more: a few tries, for a second at most."""
    for _ in range(100):
        reserved = socket.socket()
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            reserved.bind(("127.0.0.1", port))
            return reserved
        except OSError:
            reserved.close()
            time.sleep(0.01)
    raise OSError(f"port {port} stays taken: cannot take the endpoint down")


class LocalAws(EmulatorClient):
    """moto on 127.0.0.1 behind `TrustEnforcingSts`. `start()`, use `endpoint_url`, `stop()`.
    With `regions`, each of them also has an STS endpoint of its own (`regions[name]`)."""

    def __init__(self, port: int = 0, regions: Sequence[str] = ()) -> None:
        self.sts = TrustEnforcingSts(DomainDispatcherApplication(create_backend_app))
        self.regions: dict[str, RegionalEndpoint] = {}
        self._wanted = tuple(regions)
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", port, self._control, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        super().__init__(f"http://127.0.0.1:{self._server.server_port}")

    def start(self) -> LocalAws:
        self._thread.start()
        for region in self._wanted:
            self.serve_region(region)
        return self

    def serve_region(self, region: str) -> RegionalEndpoint:
        """The STS endpoint of `region`, made (and up) on a port of its own if it is new."""
        if region not in self.regions:
            self.regions[region] = RegionalEndpoint(region, self.sts)
        return self.regions[region]

    @property
    def endpoint_urls(self) -> tuple[str, ...]:
        """The regional endpoints as BROKER_STS_ENDPOINT_URLS takes them (REGION=URL)."""
        return tuple(f"{name}={region.endpoint_url}" for name, region in self.regions.items())

    def _control(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """`POST /_emulator/regions/<region>/<down|hang|up>`, for `broker dev`; the rest is
        the emulator's."""
        asked = _CONTROL.fullmatch(environ.get("PATH_INFO", ""))
        if asked is None or environ.get("REQUEST_METHOD") != "POST":
            return self.sts(environ, start_response)
        region = self.regions.get(asked.group(1))
        if region is None:
            served = ", ".join(self.regions) or "none"
            text = f"no endpoint of its own for {asked.group(1)} (served: {served})\n"
            status = "404 Not Found"
        else:
            getattr(region, asked.group(2))()
            text, status = f"{region.region} is {region.mode}\n", "200 OK"
        body = text.encode()
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def stop(self) -> None:
        for region in self.regions.values():
            region.stop()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
