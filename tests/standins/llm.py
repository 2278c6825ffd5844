"""Local stand-ins for chat models (aiohttp on 127.0.0.1, port 0): the ``llm`` fixture.

One server answers both APIs incidentd speaks:

* OpenAI-compatible ``POST /v1/chat/completions`` (vLLM, Ollama, hosted APIs), Bearer key checked when
  ``api_key`` is set;
* AWS Bedrock Converse ``POST /model/{modelId}/converse``: a SigV4 ``Authorization`` header is required
  and accepted, not verified.

It records every request. By default it answers like a well-behaved model grounded in what it was given:
valid JSON that cites the first runbook passage of the prompt (``[id]`` lines). ``script`` queues other
behaviours for the next calls: a status (429 with Retry-After, 500), a delay (for timeouts), free text
(malformed output), an answer cut off at the token limit, or an answer citing a passage it was not given.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

API_KEY = "sk-standin-0123456789abcdef"
PASSAGE = re.compile(r"^\[([^\]\s]+\.md#[^\]\s]+)\] (.*)$", re.MULTILINE)


@dataclass
class Behaviour:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    text: str | None = None  # the model's answer as is
    truncated: bool = False
    cite: str | None = None  # cite this id instead of the first passage's


@dataclass
class Call:
    api: str  # "openai" | "bedrock"
    path: str
    headers: dict[str, str]
    json: Any

    @property
    def prompt(self) -> str:
        """Everything the model was sent (system and every turn), as one text."""
        if self.api == "openai":
            return "\n".join(str(m["content"]) for m in self.json["messages"])
        texts = [s["text"] for s in self.json.get("system", [])]
        texts += [c["text"] for m in self.json["messages"] for c in m["content"]]
        return "\n".join(texts)


class ModelStandIn:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.behaviours: list[Behaviour] = []
        self.url = ""
        self.api_key = ""

    def script(self, *behaviours: Behaviour) -> None:
        self.behaviours.extend(behaviours)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/model/{model}/converse", self.bedrock)
        return app

    async def _next(self, api: str, request: web.Request) -> tuple[Behaviour, Call]:
        call = Call(api, request.path, dict(request.headers), await request.json())
        self.calls.append(call)
        behaviour = self.behaviours.pop(0) if self.behaviours else Behaviour()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        return behaviour, call

    async def openai(self, request: web.Request) -> web.Response:
        behaviour, call = await self._next("openai", request)
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
        if behaviour.status != 200:
            return web.json_response({"error": {"message": f"stand-in status {behaviour.status}"}},
                                     status=behaviour.status, headers=behaviour.headers)  # fmt: skip
        text = _answer(call.prompt, behaviour)
        return web.json_response({
            "id": "chatcmpl-standin", "object": "chat.completion", "model": call.json["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if behaviour.truncated else "stop"}],
            "usage": {"prompt_tokens": len(call.prompt) // 4, "completion_tokens": len(text) // 4},
        })  # fmt: skip

    async def bedrock(self, request: web.Request) -> web.Response:
        behaviour, call = await self._next("bedrock", request)
        if not request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
            missing = {"x-amzn-ErrorType": "MissingAuthenticationTokenException"}
            return web.json_response({"message": "Missing Authentication Token"}, status=403, headers=missing)
        if behaviour.status != 200:
            kind = {429: "ThrottlingException", 400: "ValidationException"}.get(
                behaviour.status, "InternalServerException"
            )
            body = {"message": f"stand-in status {behaviour.status}"}
            headers = {"x-amzn-ErrorType": kind, **behaviour.headers}
            return web.json_response(body, status=behaviour.status, headers=headers)
        text = _answer(call.prompt, behaviour)
        return web.json_response({
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "max_tokens" if behaviour.truncated else "end_turn",
            "usage": {"inputTokens": len(call.prompt) // 4, "outputTokens": len(text) // 4,
                      "totalTokens": (len(call.prompt) + len(text)) // 4},
            "metrics": {"latencyMs": 5},
        })  # fmt: skip


def _answer(prompt: str, behaviour: Behaviour) -> str:
    if behaviour.text is not None:
        return behaviour.text
    passages = PASSAGE.findall(prompt)
    first_id, heading = passages[0] if passages else ("", "")
    cite = behaviour.cite if behaviour.cite is not None else first_id
    answer = {
        "summary": f"Matches the runbook section '{heading}'." if heading else "No runbook matches.",
        "probable_causes": [{"cause": "what the runbook describes", "confidence": 0.7,
                             "evidence": ["the alert's labels and annotations"]}],
        "next_steps": [{"step": "follow the runbook's diagnosis", "cites": [cite] if cite else []}],
        "related_incidents": [],
    }  # fmt: skip
    text = json.dumps(answer)
    return text[: len(text) // 2] if behaviour.truncated else text


@pytest.fixture
async def llm() -> AsyncIterator[ModelStandIn]:
    stand_in = ModelStandIn()
    runner = web.AppRunner(stand_in.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield stand_in
    finally:
        await runner.cleanup()
