""":class:`application.ports.Analyst` for any OpenAI-compatible chat endpoint (vLLM, Ollama, hosted
APIs): ``POST {base_url}/chat/completions`` through aiohttp.

Errors: 429 (with its Retry-After), 408, 5xx, timeouts and connection errors are :class:`TransientError`;
other 4xx (bad key, unknown model, invalid request) and answers that are not a chat completion are
:class:`PermanentError`. The analysis records either on the timeline (application/analysis.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from application.errors import PermanentError, TransientError
from application.ports import AnalystReply, ChatTurn
from infra.http import parse_retry_after


class OpenAIChat:
    def __init__(
        self, session: aiohttp.ClientSession, *, base_url: str, model: str, api_key: str = "",
        json_mode: bool = True,
    ) -> None:  # fmt: skip
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._json_mode = json_mode

    @property
    def name(self) -> str:
        return f"openai/{self._model}"

    async def complete(self, system: str, turns: Sequence[ChatTurn], *, max_tokens: int) -> AnalystReply:
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": "system", "content": system}]
            + [{"role": t.role, "content": t.text} for t in turns],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if self._json_mode:
            payload["response_format"] = {"type": "json_object"}
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers) as response:
                if response.status >= 400:
                    raise _error(response.status, await response.text(), response.headers.get("Retry-After"))
                body = await response.json(content_type=None)
        except TimeoutError:
            raise TransientError("the model endpoint did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"cannot reach the model endpoint: {exc}") from None
        except ValueError as exc:
            raise PermanentError(f"the model endpoint answered something that is not JSON: {exc}") from None
        return _reply(body, self._model)

    async def close(self) -> None:
        await self._session.close()


def _error(status: int, text: str, retry_after: str | None) -> Exception:
    what = f"the model endpoint answered {status}: {text[:300]}"
    if status == 429:
        delay = parse_retry_after(retry_after)
        return TransientError(what + (f" (Retry-After {delay:g} s)" if delay else ""), retry_after=delay)
    if status == 408 or status >= 500:
        return TransientError(what)
    return PermanentError(what)


def _reply(body: Any, model: str) -> AnalystReply:
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
        usage = body.get("usage") or {}
        return AnalystReply(
            text=str(text),
            model=f"openai/{body.get('model') or model}",
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            truncated=choice.get("finish_reason") == "length",
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise PermanentError(f"the model endpoint's answer is not a chat completion: {exc!r}") from None
