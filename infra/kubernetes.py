"""The Kubernetes adapter (:class:`application.ports.Cluster`) on kubernetes-asyncio.

Reads Deployments and Namespaces to validate and enrich incidents, and acts on Deployments the way
kubectl does: ``rollout restart`` is kubectl's own strategic-merge patch of the pod template's
``kubectl.kubernetes.io/restartedAt`` annotation, ``scale`` goes through the ``scale`` subresource (so
RBAC can grant it separately). Every API call is bounded by ``timeout``; failures leave this module only
as :class:`TransientError` or :class:`PermanentError`.

Imported only when ``kubernetes_enabled`` is set (kubernetes-asyncio is heavy).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import structlog
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from application.errors import IncidentdError, PermanentError, TransientError
from application.ports import ActionResult, DeploymentStatus, Missing, RolloutState
from common.closing import closing

if TYPE_CHECKING:
    from config.settings import Settings

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
# Names as the API server validates them: a namespace is a DNS-1123 label, a Deployment a DNS-1123
# subdomain. Checking first turns a typo in an alert label into a clear PermanentError, and keeps
# anything that is not a name out of the request path.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Statuses after which the same request can succeed: rate limiting, server trouble, a conflict with a
# concurrent writer, and 401 (a rotated service-account token is re-read before the next request).
_TRANSIENT_STATUSES = {401, 408, 409, 429}
_MAX_RETRY_AFTER = 300.0

T = TypeVar("T")
log = structlog.get_logger(__name__)


@asynccontextmanager
async def open_cluster(settings: Settings) -> AsyncIterator[KubernetesCluster]:
    """The cluster the ``kubernetes_*`` settings name (see :func:`connect`); its connection pool closed on
    exit."""
    cluster = await connect(
        host=settings.kubernetes_host,
        kubeconfig=settings.kubernetes_kubeconfig,
        context=settings.kubernetes_context,
        call_timeout=settings.kubernetes_timeout,
        dry_run=settings.dry_run,
    )
    async with closing(cluster):
        yield cluster


async def connect(
    *,
    host: str = "",
    kubeconfig: Path | None = None,
    context: str = "",
    call_timeout: float = 10.0,
    dry_run: bool = False,
) -> KubernetesCluster:
    """A cluster client configured from, in this order: an explicit ``host`` (no credentials; tests,
    ``kubectl proxy``), a kubeconfig file, the pod's service account, ``~/.kube/config``.

    Raises kubernetes-asyncio's ConfigException when no configuration can be loaded: that is a
    start-up error, not a message's.
    """
    configuration = client.Configuration()
    if host:
        configuration.host = host.rstrip("/")
    elif kubeconfig is not None:
        await config.load_kube_config(
            config_file=str(kubeconfig),
            context=context or None,
            client_configuration=configuration,
            persist_config=False,
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        load_incluster: Callable[..., None] = config.load_incluster_config  # untyped in the library
        load_incluster(client_configuration=configuration)
    else:
        await config.load_kube_config(
            context=context or None, client_configuration=configuration, persist_config=False
        )
    return KubernetesCluster(client.ApiClient(configuration), timeout=call_timeout, dry_run=dry_run)


class KubernetesCluster:
    """:class:`application.ports.Cluster` over one kubernetes-asyncio ApiClient (one connection pool)."""

    def __init__(self, api: client.ApiClient, *, timeout: float, dry_run: bool = False) -> None:
        self._api = api
        self._apps = client.AppsV1Api(api)
        self._core = client.CoreV1Api(api)
        self._timeout = timeout
        self._dry_run = dry_run

    async def close(self) -> None:
        await self._api.close()

    async def namespace_exists(self, namespace: str) -> bool:
        _check_namespace(namespace)
        found = await self._call(f"read namespace {namespace}", self._core.read_namespace, namespace)
        return found is not None

    async def deployment_status(self, namespace: str, name: str) -> DeploymentStatus | Missing:
        """The Deployment's replicas, images and rollout state, or which of namespace/Deployment is
        missing (so the incident can say so instead of the message failing)."""
        deployment = await self._read_deployment(namespace, name)
        if deployment is None:
            return await self._missing(namespace, name)
        return _status(deployment)

    async def rollout_restart(self, namespace: str, name: str) -> ActionResult:
        """Exactly ``kubectl rollout restart``: refused for a paused Deployment, else the pod template
        gets a new ``restartedAt`` annotation and the Deployment controller rolls every pod."""
        deployment = await self._existing_deployment(namespace, name, "restart")
        if deployment.spec.paused:
            raise PermanentError(
                f"cannot restart paused Deployment {namespace}/{name} (run `kubectl rollout resume` first)"
            )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, as kubectl writes it
        result = ActionResult(
            "rollout restart", f"deployment {namespace}/{name}", f"{RESTARTED_AT}={now}", self._dry_run
        )
        if not self._dry_run:
            patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
            await self._call(
                f"restart deployment {namespace}/{name}",
                self._apps.patch_namespaced_deployment,
                name,
                namespace,
                patch,
                missing_ok=False,
            )
        log.info("kubernetes.action", action=result.action, target=result.target, dry_run=self._dry_run)
        return result

    async def scale(self, namespace: str, name: str, replicas: int) -> ActionResult:
        """Set the Deployment's desired replicas through the ``scale`` subresource."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise PermanentError(f"cannot scale to {replicas!r} replicas: need a whole number >= 0")
        deployment = await self._existing_deployment(namespace, name, "scale")
        before = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        result = ActionResult(
            "scale", f"deployment {namespace}/{name}", f"replicas {before} -> {replicas}", self._dry_run
        )
        if not self._dry_run:
            await self._call(
                f"scale deployment {namespace}/{name}",
                self._apps.patch_namespaced_deployment_scale,
                name,
                namespace,
                {"spec": {"replicas": replicas}},
                missing_ok=False,
            )
        log.info("kubernetes.action", action=result.action, target=result.target, dry_run=self._dry_run)
        return result

    async def _read_deployment(self, namespace: str, name: str) -> Any | None:
        _check_namespace(namespace)
        _check_name(name)
        return await self._call(
            f"read deployment {namespace}/{name}", self._apps.read_namespaced_deployment, name, namespace
        )

    async def _existing_deployment(self, namespace: str, name: str, action: str) -> Any:
        deployment = await self._read_deployment(namespace, name)
        if deployment is None:
            raise PermanentError(f"cannot {action}: {await self._missing(namespace, name)}")
        return deployment

    async def _missing(self, namespace: str, name: str) -> Missing:
        if not await self.namespace_exists(namespace):
            return Missing("Namespace", namespace)
        return Missing("Deployment", namespace, name)

    async def _call(
        self, what: str, method: Callable[..., Awaitable[T]], *args: Any, missing_ok: bool = True
    ) -> T | None:
        """One API call under the timeout; a 404 is ``None`` when ``missing_ok``, else PermanentError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await method(*args)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise classify(exc, what) from exc
        except Exception as exc:
            raise classify(exc, what, timeout=self._timeout) from exc


def classify(exc: BaseException, what: str, *, timeout: float | None = None) -> IncidentdError:
    """Map a kubernetes-asyncio / aiohttp failure onto retry-later or dead-letter-now."""
    if isinstance(exc, IncidentdError):
        return exc
    if isinstance(exc, ApiException):
        status = exc.status or 0
        text = f"{what}: Kubernetes API answered {status} {_reason(exc)}"
        if status >= 500 or status in _TRANSIENT_STATUSES:
            return TransientError(text, retry_after=_retry_after(exc))
        return PermanentError(text)
    if isinstance(exc, TimeoutError):
        return TransientError(f"{what}: no answer from the Kubernetes API within {timeout}s")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return TransientError(f"{what}: cannot reach the Kubernetes API: {exc!r}")
    if isinstance(exc, ValueError | TypeError):
        return PermanentError(f"{what}: {exc}")
    return TransientError(f"{what}: {exc!r}")


def _status(deployment: Any) -> DeploymentStatus:
    spec, status, meta = deployment.spec, deployment.status, deployment.metadata
    template_meta = spec.template.metadata
    annotations = (template_meta.annotations if template_meta is not None else None) or {}
    containers = spec.template.spec.containers if spec.template.spec is not None else []
    return DeploymentStatus(
        namespace=meta.namespace,
        name=meta.name,
        desired_replicas=spec.replicas if spec.replicas is not None else 1,
        ready_replicas=(status.ready_replicas if status else None) or 0,
        updated_replicas=(status.updated_replicas if status else None) or 0,
        available_replicas=(status.available_replicas if status else None) or 0,
        images=tuple(c.image for c in containers or [] if c.image),
        rollout=rollout_state(deployment),
        last_restart=_parse_time(annotations.get(RESTARTED_AT)),
        paused=bool(spec.paused),
    )


def rollout_state(deployment: Any) -> RolloutState:
    """The verdict of ``kubectl rollout status`` (its DeploymentStatusViewer), without waiting."""
    spec, status, meta = deployment.spec, deployment.status, deployment.metadata
    if status is None or (meta.generation or 0) > (status.observed_generation or 0):
        return "progressing"  # the controller has not seen the latest spec yet
    for condition in status.conditions or []:
        if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
            return "stalled"
    desired = spec.replicas if spec.replicas is not None else 1
    updated = status.updated_replicas or 0
    if updated < desired or (status.replicas or 0) > updated or (status.available_replicas or 0) < updated:
        return "progressing"
    return "complete"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None  # written by hand; not worth failing an enrichment over


def _reason(exc: ApiException) -> str:
    """The API server's own message from its Status body, else the HTTP reason phrase."""
    try:
        body = json.loads(exc.body or b"{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.reason}: {message}" if message else str(exc.reason or "")


def _retry_after(exc: ApiException) -> float | None:
    try:
        headers: Any = exc.headers or {}
        value = float(headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(value, 0.0), _MAX_RETRY_AFTER)


def _check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not _LABEL.match(namespace):
        raise PermanentError(f"{namespace!r} is not a valid Kubernetes namespace name")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _SUBDOMAIN.match(name):
        raise PermanentError(f"{name!r} is not a valid Deployment name")
