"""The ingest over HTTP, on RabbitMQ and on the Pub/Sub emulator: what a sender sees, and what reaches
the broker (``broker.published()``). The real application is served on a loopback port."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from application.errors import DecodeError
from application.factory import CommandFactory
from application.handlers import HANDLERS
from application.messages import TYPE_ATTR, Message
from tests.conftest import fixture_json
from tests.ingest.conftest import READ_TOKEN, TOKEN, BrokerUnderTest, Client, bearer, eventually, serving

pytestmark = pytest.mark.integration

ENDPOINTS = [
    ("/v1/alertmanager", "alertmanager_firing", "alertmanager.webhook"),
    ("/v1/alertmanager", "alertmanager_resolved", "alertmanager.webhook"),
    ("/v1/opsgenie", "oec_create", "opsgenie.action"),
    ("/v1/opsgenie", "oec_acknowledge", "opsgenie.action"),
    ("/v1/events", "aws_health", "aws.event"),
    ("/v1/events", "aws_securityhub", "aws.event"),
]
COMMANDS = {
    "incident.create": {"title": "Disk full on db-1", "service": "db", "severity": "high"},
    "incident.acknowledge": {"dedup_key": "db-disk", "note": "looking"},
    "incident.resolve": {"dedup_key": "db-disk"},
    "incident.note": {"dedup_key": "db-disk", "note": "freed 20 GB"},
}


def write(path: Path, text: str) -> None:
    path.write_text(text)


def dead_letter_reason(type_name: str, body: bytes) -> str:
    """What the worker's factory says about this body: the reason its dead letter would carry."""
    try:
        CommandFactory(HANDLERS).decode(Message(body, {TYPE_ATTR: type_name}))
    except DecodeError as exc:
        return str(exc)
    raise AssertionError("the factory accepts this body")


async def post(
    client: Client, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with client.post(path, data=body, headers=bearer() if headers is None else headers) as response:
        text = await response.text()
        if response.content_type in ("application/json", "application/problem+json"):
            return response.status, {**json.loads(text), "_headers": dict(response.headers)}
        return response.status, text


async def test_every_endpoint_publishes_the_fixture_as_sent(client: Client, broker: BrokerUnderTest) -> None:
    """Each endpoint answers 202 with a message id for the sources' real payloads, and the broker holds
    exactly that body (byte for byte: groupKey and unknown fields kept), its type and that id."""
    sent = {}
    for path, name, type_name in ENDPOINTS:
        body = json.dumps(fixture_json(name) | {"x-unknown-field": name}).encode()
        status, answer = await post(client, path, body)
        assert status == 202, answer
        assert answer["type"] == type_name
        sent[answer["message_id"]] = (body, type_name)
    commands = {}
    for type_name, doc in COMMANDS.items():
        status, answer = await post(client, f"/v1/commands/{type_name}", json.dumps(doc).encode())
        assert status == 202, answer
        commands[answer["message_id"]] = (doc | {"actor": "alertmanager"}, type_name)
    published = await broker.published()
    webhooks = {p.message_id: (p.body, p.attributes[TYPE_ATTR]) for p in published if p.message_id in sent}
    assert webhooks == sent
    # Commands are published as sent, with the token's name as their actor.
    assert {
        p.message_id: (json.loads(p.body), p.attributes[TYPE_ATTR])
        for p in published
        if p.message_id not in sent
    } == commands
    assert {p.attributes["x-incidentd-sender"] for p in published} == {"alertmanager"}


async def test_a_command_acts_as_its_token_whatever_the_body_claims(
    client: Client, broker: BrokerUnderTest
) -> None:
    """The actor of a /v1/commands command is the token's name: a body without an actor gets it; a body
    naming the token's own name passes; a body naming someone else is refused (400, saying why) and
    nothing of it is published."""
    doc = COMMANDS["incident.create"]
    status, answer = await post(client, "/v1/commands/incident.create", json.dumps(doc).encode())
    assert status == 202, answer
    same = json.dumps(doc | {"actor": "alertmanager", "title": "again"}).encode()
    assert (await post(client, "/v1/commands/incident.create", same))[0] == 202
    other = json.dumps(doc | {"actor": "the-ceo"}).encode()
    status, answer = await post(client, "/v1/commands/incident.create", other)
    assert status == 400 and answer["type"] == "urn:incidentd:problem:invalid-body"
    assert "actor" in answer["detail"] and "'the-ceo'" in answer["detail"]
    published = await broker.published()
    assert [json.loads(p.body)["actor"] for p in published] == ["alertmanager", "alertmanager"]


async def test_a_retried_request_keeps_its_message_id(client: Client, broker: BrokerUnderTest) -> None:
    """A sender retrying the same webhook gets the same message id (the worker's idempotency record
    then applies it once); another endpoint or another body gets another id."""
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    first = (await post(client, "/v1/alertmanager", body))[1]["message_id"]
    again = (await post(client, "/v1/alertmanager", body))[1]["message_id"]
    other = (await post(client, "/v1/alertmanager", body.replace(b"checkout", b"payments")))[1]["message_id"]
    assert first == again != other


BAD_BODIES = {
    "not JSON": b"alert: disk full",
    "wrong shape (an OEC action)": json.dumps(fixture_json("oec_create")).encode(),
    "a JSON array": b"[1, 2, 3]",
    "no alerts": json.dumps(fixture_json("alertmanager_firing") | {"alerts": []}).encode(),
    "10,000-deep nesting": b'{"version": "4", "alerts": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "invalid UTF-8": b'{"version": "4", "groupKey": "\xff\xfe", "alerts": []}',
    "empty": b"",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_a_bad_body_is_a_400_with_the_dead_letter_reason(
    client: Client, broker: BrokerUnderTest, case: str
) -> None:
    """A body the worker would dead-letter is answered 400 (problem+json) with the same reason text,
    and nothing is published."""
    body = BAD_BODIES[case]
    status, answer = await post(client, "/v1/alertmanager", body)
    assert status == 400, answer
    assert answer["type"] == "urn:incidentd:problem:invalid-body"
    assert answer["detail"] == dead_letter_reason("alertmanager.webhook", body)
    assert answer["_headers"]["Content-Type"].startswith("application/problem+json")
    assert await broker.published() == []


async def test_over_the_size_limit_is_a_413_and_a_batch_of_1000_alerts_fits(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """The default limit takes an Alertmanager batch of 1,000 alerts; one byte over the limit is a 413,
    whether the sender declares its length or streams the body, and is not published."""
    firing = fixture_json("alertmanager_firing")
    batch = firing | {"alerts": [firing["alerts"][i % 2] | {"fingerprint": f"{i:016x}"} for i in range(1000)]}
    big = json.dumps(batch).encode()
    async with serving(broker, tokens_file) as client:
        status, answer = await post(client, "/v1/alertmanager", big)
        assert status == 202, answer
    async with serving(broker, tokens_file, http_max_body_bytes=len(big) - 1) as client:
        status, answer = await post(client, "/v1/alertmanager", big)
        assert status == 413 and answer["type"] == "urn:incidentd:problem:too-large"

        async def stream() -> Any:
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]

        async with client.post("/v1/alertmanager", data=stream(), headers=bearer()) as response:
            assert response.status == 413
    assert len(await broker.published()) == 1


async def test_an_unknown_command_type_is_a_404(client: Client, broker: BrokerUnderTest) -> None:
    """/v1/commands/{type} takes only incident.create|acknowledge|resolve|note; nothing else is published."""
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    status, answer = await post(client, "/v1/commands/alertmanager.webhook", body)
    assert status == 404 and answer["type"] == "urn:incidentd:problem:unknown-command-type"
    assert await broker.published() == []


async def test_a_wrong_or_missing_token_is_a_401_that_says_nothing_more(
    client: Client, broker: BrokerUnderTest
) -> None:
    """No token, a wrong token, a right name with a wrong password, a wrong name with a right password:
    the same 401 answer each time, and nothing is published. Bearer and basic with the right token pass."""
    import base64

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    answers = []
    wrong = [{}, bearer("x" * 30), bearer(TOKEN + "x"), basic("alertmanager", "wrong-token-0123456789")]
    wrong += [basic("someone", TOKEN), {"Authorization": "Token " + TOKEN}]
    for headers in wrong:
        status, answer = await post(client, "/v1/alertmanager", body, headers)
        assert status == 401
        assert answer["_headers"]["WWW-Authenticate"].startswith("Bearer")
        answers.append({k: v for k, v in answer.items() if k != "_headers"})
    assert all(a == answers[0] for a in answers)
    assert await broker.published() == []
    assert (await post(client, "/v1/alertmanager", body, basic("alertmanager", TOKEN)))[0] == 202
    assert (await post(client, "/v1/alertmanager", body, bearer()))[0] == 202


async def test_a_read_token_cannot_ingest(client: Client, broker: BrokerUnderTest) -> None:
    """A token with only the read role gets 403 on the ingest and on commands; nothing is published."""
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    status, answer = await post(client, "/v1/alertmanager", body, bearer(READ_TOKEN))
    assert status == 403 and answer["type"] == "urn:incidentd:problem:forbidden"
    command = json.dumps(COMMANDS["incident.create"]).encode()
    status, _ = await post(client, "/v1/commands/incident.create", command, bearer(READ_TOKEN))
    assert status == 403
    assert await broker.published() == []


async def test_the_rate_limit_answers_429_with_retry_after(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """Past its burst, a token gets 429 with Retry-After (whole seconds); another token is not affected."""
    other = "other-token-0123456789abcdef"
    with tokens_file.open("a") as f:
        f.write(f"other:{other}\n")
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    async with serving(broker, tokens_file, http_rate_limit=0.5, http_rate_burst=3) as client:
        statuses = [(await post(client, "/v1/alertmanager", body))[0] for _ in range(3)]
        status, answer = await post(client, "/v1/alertmanager", body)
        assert statuses == [202, 202, 202]
        assert status == 429 and answer["type"] == "urn:incidentd:problem:rate-limited"
        assert int(answer["_headers"]["Retry-After"]) in (1, 2)
        assert (await post(client, "/v1/alertmanager", body, bearer(other)))[0] == 202
    assert len(await broker.published()) == 4


async def test_a_changed_tokens_file_is_reread_and_a_broken_one_is_not_used(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """A token added to the file is accepted within the reload interval without a restart; a file that no
    longer parses leaves the tokens in force (and a removed token stops working once a good file is back)."""
    body = json.dumps(COMMANDS["incident.create"]).encode()
    new = "rotated-token-0123456789abcdef"
    async with serving(broker, tokens_file, http_tokens_reload_interval=0.1) as client:

        async def accepted(token: str) -> bool:
            return (await post(client, "/v1/commands/incident.create", body, bearer(token)))[0] == 202

        with capture_logs() as logs:
            write(tokens_file, "this line is not a token\n")
            await eventually(lambda: any(e["event"] == "http.tokens_reload_failed" for e in logs))
        assert "line 1" in next(e["reason"] for e in logs if e["event"] == "http.tokens_reload_failed")
        assert await accepted(TOKEN)
        write(tokens_file, f"rotated:{new}\n")
        await eventually(lambda: accepted(new), timeout=30)
        assert not await accepted(TOKEN)


async def test_a_body_that_does_not_arrive_in_time_is_a_408(
    broker: BrokerUnderTest, tokens_file: Path
) -> None:
    """A sender that declares a body and stops sending it half-way gets 408 after the read timeout (its
    connection does not stay occupied), and nothing is published."""
    body = json.dumps(fixture_json("alertmanager_firing")).encode()
    async with serving(broker, tokens_file, http_read_timeout=0.5) as client:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        head = (
            f"POST /v1/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[: len(body) // 2])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        assert status_line.split()[1] == b"408"
    assert await broker.published() == []
