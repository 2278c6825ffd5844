"""POST /v1/incidents/{id}/acknowledge|resolve|notes: published for the worker, never written here."""

from __future__ import annotations

import json
import uuid

import pytest

from application.messages import TYPE_ATTR
from infra.web.ingest import SENDER_ATTR
from tests.api.conftest import INGEST_TOKEN, READ_TOKEN, WRITE_TOKEN, WRITER, Api, bearer, incident, seed


@pytest.mark.parametrize(
    ("action", "type_name", "body"),
    [
        ("acknowledge", "incident.acknowledge", {}),
        ("resolve", "incident.resolve", {"note": "rolled back"}),
        ("notes", "incident.note", {"note": "looking at the <b>DB</b>"}),
    ],
)
async def test_an_action_publishes_the_command_as_the_token_and_leaves_the_store(
    api: Api, action: str, type_name: str, body: dict[str, str]
) -> None:
    """202 with the message id; the broker holds the command with the token's name as actor and sender;
    the store is unchanged (the worker applies it)."""
    (target,) = await seed(api.store, incident("api down"))
    response = await api.client.post(
        f"/v1/incidents/{target.id}/{action}", json=body, headers=bearer(WRITE_TOKEN)
    )
    assert response.status == 202
    answer = await response.json()
    assert answer["status"] == "accepted" and answer["type"] == type_name
    assert answer["incident_id"] == str(target.id)
    (message,) = api.published()
    assert message.message_id == answer["message_id"]
    assert message.attributes[TYPE_ATTR] == type_name
    assert message.attributes[SENDER_ATTR] == WRITER
    published = json.loads(message.body)
    assert published["incident_id"] == str(target.id)
    assert published["actor"] == WRITER
    assert published["note"] == body.get("note", "")
    stored = await api.store.get(target.id)
    assert stored.status == "open" and len(stored.timeline) == 1  # the API wrote nothing


async def test_an_empty_body_is_fine_for_acknowledge(api: Api) -> None:
    """No body at all (``curl -X POST``) acknowledges without a note."""
    (target,) = await seed(api.store, incident())
    response = await api.client.post(f"/v1/incidents/{target.id}/acknowledge", headers=bearer(WRITE_TOKEN))
    assert response.status == 202
    assert len(api.published()) == 1


async def test_the_same_idempotency_key_is_the_same_message(api: Api) -> None:
    """A client retrying with the same Idempotency-Key gets the same message id (the worker applies it
    once); another key, or none, is another message."""
    (target,) = await seed(api.store, incident())
    path = f"/v1/incidents/{target.id}/resolve"
    ids = []
    for key in ("k-1", "k-1", "k-2", None):
        headers = bearer(WRITE_TOKEN) | ({"Idempotency-Key": key} if key else {})
        response = await api.client.post(path, json={}, headers=headers)
        assert response.status == 202
        ids.append((await response.json())["message_id"])
    assert ids[0] == ids[1]
    assert len({ids[1], ids[2], ids[3]}) == 3


async def test_a_read_token_cannot_act_and_nothing_is_published(api: Api) -> None:
    """Read token: 403; ingest-only token: 403; no token: 401 - and nothing reaches the broker."""
    (target,) = await seed(api.store, incident())
    path = f"/v1/incidents/{target.id}/acknowledge"
    response = await api.client.post(path, json={}, headers=bearer(READ_TOKEN))
    assert response.status == 403
    assert "lacks the role 'write'" in (await response.json(content_type=None))["detail"]
    assert (await api.client.post(path, json={}, headers=bearer(INGEST_TOKEN))).status == 403
    assert (await api.client.post(path, json={})).status == 401
    assert api.published() == []


@pytest.mark.parametrize(
    ("action", "body", "status", "reason"),
    [
        ("notes", {}, 400, "note: a note needs some text"),
        ("notes", {"note": "   "}, 400, "note: a note needs some text"),
        ("acknowledge", {"note": 5}, 400, "note: Input should be a valid string"),
        ("acknowledge", {"actor": "someone-else"}, 400, "actor: unknown field"),
        ("resolve", {"note": "x" * 10_001}, 400, "note: String should have at most 10000 characters"),
        ("resolve", "not json", 400, "Invalid JSON"),
        ("reopen", {}, 404, ""),
    ],
)
async def test_a_bad_action_is_refused_before_publishing(
    api: Api, action: str, body: object, status: int, reason: str
) -> None:
    """A bad body is a 400 naming the field (the actor cannot be chosen by the caller); an unknown
    action is a 404; nothing is published."""
    (target,) = await seed(api.store, incident())
    data = body if isinstance(body, str) else json.dumps(body)
    response = await api.client.post(
        f"/v1/incidents/{target.id}/{action}", data=data, headers=bearer(WRITE_TOKEN)
    )
    assert response.status == status
    assert reason in (await response.json(content_type=None))["detail"]
    assert api.published() == []


async def test_acting_on_an_unknown_incident_is_404(api: Api) -> None:
    """An id without an incident: 404, not a command the worker would dead-letter."""
    response = await api.client.post(
        f"/v1/incidents/{uuid.uuid4()}/resolve", json={}, headers=bearer(WRITE_TOKEN)
    )
    assert response.status == 404
    assert api.published() == []
