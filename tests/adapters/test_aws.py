"""The AWS adapter against moto's server (EC2, S3, CloudWatch, Lambda) on loopback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from application.errors import PermanentError, TransientError
from application.ports import ActionResult
from infra.aws import AwsCloud, classify
from tests.adapters.conftest import AWS_TIMEOUT, REGION, unique

# --- EC2 --------------------------------------------------------------------------------------------


async def run_instance(aws: Any, **tags: str) -> str:
    tags = tags or {"Name": unique("instance")}
    async with aws("ec2") as ec2:
        response = await ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.small",
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ],
        )
    return str(response["Instances"][0]["InstanceId"])


async def test_describe_instances_reads_state_type_and_tags(aws: Any, cloud: AwsCloud) -> None:
    """An instance named by an AWS Health event is described with its state, type, zone and tags."""
    instance_id = await run_instance(aws, Name="web-1", service="checkout")

    (instance,) = await cloud.describe_instances([instance_id])

    assert instance.instance_id == instance_id
    assert instance.state == "running"
    assert instance.instance_type == "t3.small"
    assert instance.availability_zone.startswith(REGION)
    assert instance.tags == {"Name": "web-1", "service": "checkout"}


async def test_reboot_of_an_existing_instance_succeeds(aws: Any, cloud: AwsCloud) -> None:
    """EC2 accepts the reboot of an instance that exists, and the instance is running afterwards."""
    instance_id = await run_instance(aws)

    result = await cloud.reboot_instances([instance_id])

    assert result == ActionResult("reboot", f"ec2 {instance_id}")
    (instance,) = await cloud.describe_instances([instance_id])
    assert instance.state == "running"


async def test_reboot_of_an_unknown_instance_is_permanent(cloud: AwsCloud) -> None:
    """An instance id EC2 does not know dead-letters with EC2's error code in the reason."""
    with pytest.raises(PermanentError, match=r"InvalidInstanceID\.NotFound"):
        await cloud.reboot_instances(["i-0123456789abcdef0"])


@pytest.mark.parametrize("ids", [[], ["web-1"], "i-0123"])
async def test_instance_ids_that_cannot_exist_are_permanent(cloud: AwsCloud, ids: Any) -> None:
    """No ids (which would describe every instance) or malformed ids fail before calling EC2."""
    with pytest.raises(PermanentError, match="instance ids"):
        await cloud.describe_instances(ids)


async def test_dry_run_reboot_asks_ec2_to_check_only(aws: Any, moto_url: str, aws_env: None) -> None:
    """In dry-run, EC2 verifies the reboot (DryRun=true) and the result says nothing was changed."""
    instance_id = await run_instance(aws)
    cloud = AwsCloud(endpoint_url=moto_url, timeout=AWS_TIMEOUT, dry_run=True)
    try:
        result = await cloud.reboot_instances([instance_id])
    finally:
        await cloud.close()

    assert result.dry_run
    assert str(result) == f"reboot ec2 {instance_id} (dry run, nothing changed)"


# --- S3 ---------------------------------------------------------------------------------------------


async def test_archive_is_readable_back_as_the_same_json(aws: Any, cloud: AwsCloud, bucket: str) -> None:
    """The incident is stored under incidents/<yyyy>/<mm>/<dd>/<id>.json as the same JSON document."""
    incident = {
        "id": "8d0e4f4c-6c1e-4f7a-9a51-3b0c2f1d9e10",
        "title": "High error rate on checkout",
        "severity": "critical",
        "timeline": [{"kind": "opened", "at": "2026-11-23T18:00:00+00:00"}],
        "labels": {"service": "checkout", "ünïcode": "✓"},
    }

    uri = await cloud.archive(incident, id=incident["id"], at=datetime(2026, 11, 23, 18, 0, tzinfo=UTC))

    key = f"incidents/2026/11/23/{incident['id']}.json"
    assert uri == f"s3://{bucket}/{key}"
    async with aws("s3") as s3:
        stored = await s3.get_object(Bucket=bucket, Key=key)
        body = await stored["Body"].read()
    assert json.loads(body) == incident
    assert stored["ContentType"] == "application/json"


async def test_archive_keys_use_the_utc_date_and_overwrite(aws: Any, cloud: AwsCloud, bucket: str) -> None:
    """The date in the key is the UTC date; archiving the same event again replaces it, never duplicates."""
    evening_in_new_york = datetime(2026, 11, 23, 22, 30, tzinfo=timezone(timedelta(hours=-5)))

    await cloud.archive({"version": 1}, id="sha256:abc", at=evening_in_new_york, kind="events")
    await cloud.archive({"version": 2}, id="sha256:abc", at=evening_in_new_york, kind="events")

    async with aws("s3") as s3:
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix="events/")
        stored = await s3.get_object(Bucket=bucket, Key="events/2026/11/24/sha256:abc.json")
        body = await stored["Body"].read()
    assert [o["Key"] for o in listing["Contents"]] == ["events/2026/11/24/sha256:abc.json"]
    assert json.loads(body) == {"version": 2}


@pytest.mark.parametrize(("kind", "id"), [("incidents", "../secrets"), ("incidents", "a/b"), ("tmp", "x")])
async def test_archive_keys_outside_the_layout_are_permanent(cloud: AwsCloud, kind: str, id: str) -> None:
    """Ids that would escape their folder, and unknown kinds, are refused."""
    with pytest.raises(PermanentError, match="cannot archive"):
        await cloud.archive({}, id=id, at=datetime.now(UTC), kind=kind)


async def test_archive_to_a_missing_bucket_is_permanent(moto_url: str, aws_env: None) -> None:
    """A bucket that does not exist (NoSuchBucket) will not appear by retrying: dead-letter."""
    cloud = AwsCloud(endpoint_url=moto_url, archive_bucket=unique("no-such-bucket"), timeout=AWS_TIMEOUT)
    try:
        with pytest.raises(PermanentError, match="NoSuchBucket"):
            await cloud.archive({}, id="x", at=datetime.now(UTC))
    finally:
        await cloud.close()


# --- CloudWatch -------------------------------------------------------------------------------------


async def test_put_metric_is_listed_back(aws: Any, cloud: AwsCloud) -> None:
    """A metric put by incidentd is listed by CloudWatch under the configured namespace and dimensions."""
    await cloud.put_metric("IncidentsOpened", 1, dimensions={"service": "checkout", "severity": "critical"})

    async with aws("cloudwatch") as cloudwatch:
        listed = await cloudwatch.list_metrics(Namespace=cloud._metric_namespace)
    (metric,) = listed["Metrics"]
    assert metric["MetricName"] == "IncidentsOpened"
    assert sorted((d["Name"], d["Value"]) for d in metric["Dimensions"]) == [
        ("service", "checkout"),
        ("severity", "critical"),
    ]


# --- Lambda -----------------------------------------------------------------------------------------


async def test_lambda_event_invocation_is_accepted(cloud: AwsCloud, lambda_function: str) -> None:
    """An Event invocation is queued by Lambda (202); moto stores functions but does not run them."""
    result = await cloud.invoke_lambda(lambda_function, {"action": "restart", "service": "checkout"})

    assert str(result) == f"invoke lambda {lambda_function}: status 202"


async def test_lambda_dry_run_only_validates(moto_url: str, aws_env: None, lambda_function: str) -> None:
    """In dry-run, the DryRun invocation type validates the call (204) without running the function."""
    cloud = AwsCloud(endpoint_url=moto_url, timeout=AWS_TIMEOUT, dry_run=True)
    try:
        result = await cloud.invoke_lambda(lambda_function, {"action": "restart"})
    finally:
        await cloud.close()

    assert result.dry_run
    assert result.detail == "status 204"


# --- failures ---------------------------------------------------------------------------------------


async def test_a_stopped_endpoint_is_transient(aws_env: None, bucket: str) -> None:
    """When the AWS endpoint goes away (connection refused), the call is retried later."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    cloud = AwsCloud(endpoint_url=f"http://{host}:{port}", archive_bucket=bucket, timeout=AWS_TIMEOUT)
    try:
        await cloud.put_metric("Up", 1)  # works while the server runs
        server.stop()
        with pytest.raises(TransientError, match="cannot reach AWS"):
            await cloud.archive({"id": 1}, id="one", at=datetime.now(UTC))
    finally:
        await cloud.close()


async def test_missing_credentials_are_permanent(moto_url: str, aws_env: None, monkeypatch: Any) -> None:
    """Without credentials in the chain, calls fail permanently with botocore's explanation."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cloud = AwsCloud(endpoint_url=moto_url, timeout=AWS_TIMEOUT)
    try:
        with pytest.raises(PermanentError, match="Unable to locate credentials"):
            await cloud.put_metric("Up", 1)
    finally:
        await cloud.close()


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("AccessDenied", 403), PermanentError),
        (client_error("UnauthorizedOperation", 403), PermanentError),
        (client_error("ValidationError", 400), PermanentError),
        (client_error("ResourceNotFoundException", 404), PermanentError),
        (client_error("Throttling", 400), TransientError),
        (client_error("RequestLimitExceeded", 503), TransientError),
        (client_error("SlowDown", 503), TransientError),
        (client_error("TooManyRequestsException", 429), TransientError),
        (client_error("InternalError", 500), TransientError),
        (client_error("SomethingNew", 502), TransientError),
        (client_error("ExpiredToken", 400), TransientError),
        (EndpointConnectionError(endpoint_url="https://ec2.example"), TransientError),
        (ReadTimeoutError(endpoint_url="https://ec2.example"), TransientError),
        (TimeoutError(), TransientError),
        (NoCredentialsError(), PermanentError),
    ],
    ids=lambda value: getattr(value, "__name__", None) or type(value).__name__,
)
def test_errors_are_classified_by_type_and_code(error: Exception, expected: type[Exception]) -> None:
    """Throttling, 5xx, timeouts and lost connections retry; denials, validation, not-found dead-letter."""
    assert type(classify(error, "call")) is expected
