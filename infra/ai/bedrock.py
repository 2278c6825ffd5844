""":class:`application.ports.Analyst` on AWS Bedrock's Converse API, through aioboto3.

Credentials and region come from the standard AWS chain (IRSA / EKS Pod Identity in a cluster);
``endpoint_url`` points the client at a stand-in in tests. botocore makes one attempt: a throttled or
failed analysis is recorded on the timeline, not retried (docs/ai.md). Errors are classified like the AWS
adapter's (infra/aws.py): throttling, 5xx, timeouts and ``ModelNotReady`` are transient, the rest
(``AccessDenied``, ``ValidationException``, an unknown model) permanent.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from botocore.config import Config

from application.errors import PermanentError, TransientError
from application.ports import AnalystReply, ChatTurn
from infra.aws import classify

_MORE_TRANSIENT = frozenset(
    {
        "ModelTimeoutException",
        "ModelNotReadyException",
        "ServiceUnavailableException",
        "InternalServerException",
    }
)


class BedrockConverse:
    def __init__(
        self, *, model: str, region: str = "", endpoint_url: str = "", timeout: float = 60.0
    ) -> None:
        self._model = model
        self._session = aioboto3.Session(region_name=region or None)
        self._endpoint_url = endpoint_url or None
        self._config = Config(
            connect_timeout=min(timeout, 10.0), read_timeout=timeout, retries={"total_max_attempts": 1}
        )
        self._stack = AsyncExitStack()
        self._client: Any = None

    @property
    def name(self) -> str:
        return f"bedrock/{self._model}"

    async def complete(self, system: str, turns: Sequence[ChatTurn], *, max_tokens: int) -> AnalystReply:
        try:
            client = await self._runtime()
            response = await client.converse(
                modelId=self._model,
                system=[{"text": system}],
                messages=[{"role": t.role, "content": [{"text": t.text}]} for t in turns],
                inferenceConfig={"maxTokens": max_tokens, "temperature": 0},
            )
        except Exception as exc:
            error = classify(exc, f"Bedrock Converse {self._model}")
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in _MORE_TRANSIENT and not isinstance(error, TransientError):
                error = TransientError(str(error))
            raise error from None
        try:
            content = response["output"]["message"]["content"]
            usage = response.get("usage") or {}
            return AnalystReply(
                text="".join(part.get("text", "") for part in content),
                model=self.name,
                input_tokens=int(usage.get("inputTokens") or 0),
                output_tokens=int(usage.get("outputTokens") or 0),
                truncated=response.get("stopReason") == "max_tokens",
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PermanentError(f"Bedrock's answer is not a Converse response: {exc!r}") from None

    async def _runtime(self) -> Any:
        if self._client is None:
            factory = self._session.client(
                "bedrock-runtime", endpoint_url=self._endpoint_url, config=self._config
            )
            self._client = await self._stack.enter_async_context(factory)
        return self._client

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
