"""Stand-ins for the adapters' systems, all in-process on 127.0.0.1.

* Kubernetes: kmock's KubernetesEmulator (the ``k8s`` fixture, tests/standins/kubernetes.py, shared with
  the end-to-end test); ``cluster`` is the adapter pointed at it.
* AWS: moto's ThreadedMotoServer, one per test session; tests use unique bucket / function names.
"""

from __future__ import annotations

import io
import json
import socket
import urllib.request
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kmock
import pytest

from infra.aws import AwsCloud
from infra.kubernetes import KubernetesCluster, connect

K8S_TIMEOUT = 2.0
AWS_TIMEOUT = 5.0
REGION = "us-east-1"

# --- Kubernetes -------------------------------------------------------------------------------------


@pytest.fixture
async def cluster(k8s: tuple[kmock.KubernetesEmulator, str]) -> AsyncIterator[KubernetesCluster]:
    cluster = await connect(host=k8s[1], call_timeout=K8S_TIMEOUT)
    yield cluster
    await cluster.close()


# --- AWS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto's server on a free loopback port; Lambda configured to accept invocations without Docker."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _post_json(f"{url}/moto-api/config", {"lambda": {"use_docker": False}})
    yield url
    server.stop()


def _post_json(url: str, document: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(document).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy credentials, and nothing from the developer's own AWS configuration or metadata service."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", str(home / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            env.delenv(name, raising=False)
        yield


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def aws(moto_url: str, aws_env: None) -> Any:
    """Plain aioboto3 clients against moto, for arranging and checking state (one session: models are
    loaded once)."""
    import aioboto3

    session = aioboto3.Session(region_name=REGION)

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=moto_url)

    return client


@pytest.fixture
async def bucket(aws: Any) -> str:
    name = unique("incidentd-archive")
    async with aws("s3") as s3:
        await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def cloud(moto_url: str, aws_env: None, bucket: str) -> AsyncIterator[AwsCloud]:
    cloud = AwsCloud(
        endpoint_url=moto_url,
        archive_bucket=bucket,
        metric_namespace=unique("incidentd-test"),
        timeout=AWS_TIMEOUT,
    )
    yield cloud
    await cloud.close()


@pytest.fixture
async def lambda_function(aws: Any) -> str:
    """A Python function in moto (moto stores it; it does not run its code)."""
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def handle(event, context):\n    return event\n")
    name = unique("restart-service")
    async with aws("iam") as iam, aws("lambda") as aws_lambda:
        role = await iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")
        await aws_lambda.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Role=role["Role"]["Arn"],
            Handler="handler.handle",
            Code={"ZipFile": code.getvalue()},
        )
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
