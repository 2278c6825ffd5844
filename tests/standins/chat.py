"""Local stand-ins for GitHub's REST API and Slack's incoming webhooks (aiohttp on 127.0.0.1, port 0);
the ``github`` and ``slack`` fixtures (tests/notify and the end-to-end test).

They record every request and answer the way the real services do for the calls incidentd makes,
including their error shapes; ``fail_next`` makes the next request fail like the real service would.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

TOKEN = "ghp_test_token"
REPO = "acme/ops"


def unused_port() -> int:
    """A loopback port nothing listens on (for "connection refused")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class StandIn:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self.delay = 0.0
        self.url = ""

    def fail_next(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.failures.append(Failure(status, body, headers or {}))

    async def _record(self, request: web.Request) -> web.Response | None:
        payload = await request.json() if request.can_read_body else None
        self.requests.append(
            Recorded(request.method, request.path, dict(request.headers), payload, dict(request.query))
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure.body, str):
                return web.Response(status=failure.status, text=failure.body, headers=failure.headers)
            return web.json_response(failure.body, status=failure.status, headers=failure.headers)
        return None


class GitHub(StandIn):
    """The issues endpoints of api.github.com: create, list, comment, update; token auth; unknown repo ->
    404. The list filters by state and labels (all must be on the issue) like GitHub's, newest first."""

    def __init__(self) -> None:
        super().__init__()
        self.issues: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[str]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/issues", self.create)
        app.router.add_get("/repos/{owner}/{repo}/issues", self.list)
        app.router.add_post("/repos/{owner}/{repo}/issues/{number}/comments", self.comment)
        app.router.add_patch("/repos/{owner}/{repo}/issues/{number}", self.update)
        return app

    async def _check(self, request: web.Request) -> web.Response | None:
        failed = await self._record(request)
        if failed is not None:
            return failed
        if request.headers.get("Authorization") != f"token {TOKEN}":
            return web.json_response(
                {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"},
                status=401,
            )
        if f"{request.match_info['owner']}/{request.match_info['repo']}" != REPO:
            return web.json_response({"message": "Not Found"}, status=404)
        return None

    def _issue(self, request: web.Request) -> dict[str, Any] | None:
        return self.issues.get(int(request.match_info["number"]))

    async def create(self, request: web.Request) -> web.Response:
        if (rejected := await self._check(request)) is not None:
            return rejected
        data = self.requests[-1].json
        if not data.get("title"):
            return web.json_response(
                {"message": "Validation Failed", "errors": [{"resource": "Issue", "code": "missing_field"}]},
                status=422,
            )
        number = len(self.issues) + 1
        issue = {
            "number": number,
            "html_url": f"https://github.com/{REPO}/issues/{number}",
            "title": data["title"],
            "body": data.get("body", ""),
            "labels": [{"name": n} for n in data.get("labels", [])],
            "state": "open",
        }
        self.issues[number] = issue
        return web.json_response(issue, status=201)

    async def list(self, request: web.Request) -> web.Response:
        if (rejected := await self._check(request)) is not None:
            return rejected
        state = request.query.get("state", "open")
        wanted = {name for name in request.query.get("labels", "").split(",") if name}
        per_page = int(request.query.get("per_page", "30"))
        found = [
            issue
            for issue in sorted(self.issues.values(), key=lambda i: i["number"], reverse=True)
            if state in ("all", issue["state"]) and wanted <= {label["name"] for label in issue["labels"]}
        ]
        return web.json_response(found[:per_page])

    async def comment(self, request: web.Request) -> web.Response:
        if (rejected := await self._check(request)) is not None:
            return rejected
        if (issue := self._issue(request)) is None:
            return web.json_response({"message": "Not Found"}, status=404)
        self.comments.setdefault(issue["number"], []).append(self.requests[-1].json["body"])
        return web.json_response(
            {"id": len(self.requests), "body": self.requests[-1].json["body"]}, status=201
        )

    async def update(self, request: web.Request) -> web.Response:
        if (rejected := await self._check(request)) is not None:
            return rejected
        if (issue := self._issue(request)) is None:
            return web.json_response({"message": "Not Found"}, status=404)
        issue.update(self.requests[-1].json)
        return web.json_response(issue)


class Slack(StandIn):
    """hooks.slack.com: 200 "ok" for known webhooks, 404 "no_service" for unknown ones."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks = {"/services/T0/B-default/x", "/services/T0/B-api/x", "/services/T0/B-prod/x"}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/services/{tail:.*}", self.post)
        return app

    def received(self, hook: str) -> list[str]:
        return [r.json["text"] for r in self.requests if r.path == hook]

    async def post(self, request: web.Request) -> web.Response:
        if (failed := await self._record(request)) is not None:
            return failed
        if request.path not in self.hooks:
            return web.Response(status=404, text="no_service")
        return web.Response(text="ok")


async def _serve(stand_in: StandIn, app: web.Application) -> AsyncIterator[Any]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stand_in.url = f"http://127.0.0.1:{port}"
    try:
        yield stand_in
    finally:
        await runner.cleanup()


@pytest.fixture
async def github() -> AsyncIterator[GitHub]:
    stand_in = GitHub()
    async for served in _serve(stand_in, stand_in.app()):
        yield served


@pytest.fixture
async def slack() -> AsyncIterator[Slack]:
    stand_in = Slack()
    async for served in _serve(stand_in, stand_in.app()):
        yield served
