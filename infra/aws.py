"""The AWS adapter (:class:`application.ports.Cloud`) on aioboto3.

Credentials and region come from the usual AWS chain (environment, profile, web identity / IRSA,
instance metadata); ``endpoint_url`` points every client at a stand-in (tests) or an S3-compatible store.
One client per service is created on first use and kept until :meth:`AwsCloud.close`, so a worker that
only archives never loads EC2's large service model.

Every call is bounded by ``timeout`` (botocore's connect/read timeouts and its few retries included);
failures leave this module only as :class:`TransientError` or :class:`PermanentError`. In dry-run,
EC2 reboot and Lambda invoke ask AWS to *check* the call (EC2 ``DryRun``, Lambda ``DryRun`` invocation
type): permissions and parameters are verified and nothing happens.

Imported only when ``aws_enabled`` is set (aioboto3 is heavy).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aioboto3
import orjson
import structlog
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
)

from application.errors import IncidentdError, PermanentError, TransientError
from application.ports import ActionResult, Instance
from common.closing import closing

if TYPE_CHECKING:
    from config.settings import Settings

# Error codes after which the same call can succeed (botocore's own retry lists, plus expired
# credentials, which the credential chain refreshes).
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
    }
)
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")
# Keeps archive keys one path segment per id: no "/", no "..", nothing S3 would need escaped.
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+@-]{0,254}$")
_KINDS = frozenset({"incidents", "events"})

T = TypeVar("T")
log = structlog.get_logger(__name__)


class AwsCloud:
    """:class:`application.ports.Cloud` over one aioboto3 session."""

    def __init__(
        self,
        *,
        region: str = "",
        endpoint_url: str = "",
        archive_bucket: str = "",
        metric_namespace: str = "incidentd",
        timeout: float = 10.0,
        max_attempts: int = 2,
        dry_run: bool = False,
    ) -> None:
        self._session = aioboto3.Session(region_name=region or None)
        self._endpoint_url = endpoint_url or None
        self._bucket = archive_bucket
        self._metric_namespace = metric_namespace
        self._timeout = timeout
        self._dry_run = dry_run
        self._config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
        )
        self._clients: dict[str, Any] = {}
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self._stack.aclose()
        self._clients.clear()

    async def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]:
        ids = _instance_ids(instance_ids)
        response = await self._call(
            f"describe EC2 instances {', '.join(ids)}",
            "ec2",
            lambda ec2: ec2.describe_instances(InstanceIds=ids),
        )
        return [_instance(i) for r in response.get("Reservations", []) for i in r.get("Instances", [])]

    async def reboot_instances(self, instance_ids: Sequence[str]) -> ActionResult:
        ids = _instance_ids(instance_ids)

        async def reboot(ec2: Any) -> None:
            try:
                await ec2.reboot_instances(InstanceIds=ids, DryRun=self._dry_run)
            except ClientError as exc:
                if not (self._dry_run and _code(exc) == "DryRunOperation"):
                    raise  # DryRunOperation is EC2's answer to a dry run that *would* have succeeded

        await self._call(f"reboot EC2 instances {', '.join(ids)}", "ec2", reboot)
        return self._acted(ActionResult("reboot", f"ec2 {', '.join(ids)}", dry_run=self._dry_run))

    async def archive(
        self, document: Mapping[str, Any], *, id: str, at: datetime, kind: str = "incidents"
    ) -> str:
        """Store ``document`` as JSON at ``<kind>/<yyyy>/<mm>/<dd>/<id>.json`` (UTC date of ``at``).

        The key depends only on the id and date, so archiving the same incident again overwrites it.
        """
        if not self._bucket:
            raise PermanentError("cannot archive: no S3 bucket configured (INCIDENTD_AWS_ARCHIVE_BUCKET)")
        key = archive_key(kind, id, at)
        body = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        await self._call(
            f"archive s3://{self._bucket}/{key}",
            "s3",
            lambda s3: s3.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/json"),
        )
        return f"s3://{self._bucket}/{key}"

    async def put_metric(
        self, name: str, value: float, *, unit: str = "Count", dimensions: Mapping[str, str] | None = None
    ) -> None:
        datum = {
            "MetricName": name,
            "Value": float(value),
            "Unit": unit,
            "Timestamp": datetime.now(UTC),
            "Dimensions": [{"Name": k, "Value": v} for k, v in (dimensions or {}).items()],
        }
        await self._call(
            f"put metric {self._metric_namespace}/{name}",
            "cloudwatch",
            lambda cw: cw.put_metric_data(Namespace=self._metric_namespace, MetricData=[datum]),
        )

    async def invoke_lambda(self, function: str, payload: Mapping[str, Any]) -> ActionResult:
        """Queue ``payload`` for ``function`` (invocation type Event); Lambda answers 202 at once."""
        body = orjson.dumps(payload)
        invocation = "DryRun" if self._dry_run else "Event"

        async def invoke(aws_lambda: Any) -> int:
            response = await aws_lambda.invoke(FunctionName=function, InvocationType=invocation, Payload=body)
            async with response["Payload"] as stream:  # release the connection
                await stream.read()
            return int(response["StatusCode"])

        status = await self._call(f"invoke Lambda {function}", "lambda", invoke)
        return self._acted(ActionResult("invoke", f"lambda {function}", f"status {status}", self._dry_run))

    def _acted(self, result: ActionResult) -> ActionResult:
        log.info("aws.action", action=result.action, target=result.target, dry_run=result.dry_run)
        return result

    async def _call(self, what: str, service: str, call: Callable[[Any], Awaitable[T]]) -> T:
        """One call, with the client of ``service``, bounded in time, its failure classified."""
        try:
            async with asyncio.timeout(self._timeout):
                return await call(await self._client(service))
        except Exception as exc:
            raise classify(exc, what, timeout=self._timeout) from exc

    async def _client(self, service: str) -> Any:
        async with self._lock:
            if service not in self._clients:
                factory = self._session.client(service, endpoint_url=self._endpoint_url, config=self._config)
                self._clients[service] = await self._stack.enter_async_context(factory)
            return self._clients[service]


@asynccontextmanager
async def open_cloud(settings: Settings) -> AsyncIterator[AwsCloud]:
    """AWS as the ``aws_*`` settings configure it; the clients created meanwhile are closed on exit."""
    cloud = AwsCloud(
        region=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        archive_bucket=settings.aws_archive_bucket,
        metric_namespace=settings.aws_metric_namespace,
        timeout=settings.aws_timeout,
        max_attempts=settings.aws_max_attempts,
        dry_run=settings.dry_run,
    )
    async with closing(cloud):
        yield cloud


def archive_key(kind: str, id: str, at: datetime) -> str:
    if kind not in _KINDS:
        raise PermanentError(f"cannot archive {kind!r}: kind must be one of {sorted(_KINDS)}")
    if not _KEY_ID.match(id) or ".." in id:
        raise PermanentError(f"cannot archive {id!r}: not usable as an S3 key segment")
    day = at.astimezone(UTC) if at.tzinfo else at
    return f"{kind}/{day:%Y/%m/%d}/{id}.json"


def classify(exc: BaseException, what: str, *, timeout: float | None = None) -> IncidentdError:
    """Map a botocore / aiobotocore failure onto retry-later or dead-letter-now."""
    if isinstance(exc, IncidentdError):
        return exc
    if isinstance(exc, ClientError):
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = exc.response.get("Error", {}).get("Message", "")
        text = f"{what}: AWS answered {code} ({status}): {message}"
        if code in TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientError(text)
        return PermanentError(text)
    if isinstance(exc, TimeoutError):
        return TransientError(f"{what}: no answer from AWS within {timeout}s")
    if isinstance(exc, ConnectionError | HTTPClientError | CredentialRetrievalError | OSError):
        return TransientError(f"{what}: cannot reach AWS: {exc}")
    if isinstance(exc, BotoCoreError | ValueError | TypeError):
        # NoCredentialsError, NoRegionError, ParamValidationError...: configuration or bad input.
        return PermanentError(f"{what}: {exc}")
    return TransientError(f"{what}: {exc!r}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _instance_ids(instance_ids: Sequence[str]) -> list[str]:
    # An empty list would make DescribeInstances answer with every instance in the region.
    ids = [instance_ids] if isinstance(instance_ids, str) else list(instance_ids)
    bad = [i for i in ids if not isinstance(i, str) or not _INSTANCE_ID.match(i)]
    if not ids or bad:
        raise PermanentError(f"need one or more EC2 instance ids like i-0123456789abcdef0, got {ids!r}")
    return ids


def _instance(data: Mapping[str, Any]) -> Instance:
    return Instance(
        instance_id=data["InstanceId"],
        state=data.get("State", {}).get("Name", ""),
        instance_type=data.get("InstanceType", ""),
        availability_zone=data.get("Placement", {}).get("AvailabilityZone", ""),
        launch_time=data.get("LaunchTime"),
        tags={t["Key"]: t["Value"] for t in data.get("Tags", [])},
    )
