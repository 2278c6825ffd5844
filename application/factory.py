"""Decodes a broker-neutral :class:`Message` into a typed :class:`Command`, or raises one DecodeError."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from application.commands import (
    FUTURE,
    PAST,
    RECEIVED,
    AlertmanagerWebhook,
    AwsEvent,
    Command,
    OpsgenieAction,
)
from application.errors import DecodeError
from application.messages import TYPE_ATTR, Message

# When a publisher sets no ``type`` attribute (e.g. Alertmanager's webhook relayed as-is), the type is
# recognised from the keys the source's payload always has.
Recogniser = Callable[[Mapping[str, Any]], bool]
SHAPES: dict[str, Recogniser] = {
    AlertmanagerWebhook.TYPE: lambda d: {"version", "groupKey", "alerts"} <= d.keys(),
    OpsgenieAction.TYPE: lambda d: {"action", "alert"} <= d.keys(),
    AwsEvent.TYPE: lambda d: {"source", "detail-type"} <= d.keys(),
}
_MAX_ERRORS = 5
# The largest body decoded. Alertmanager batches and EventBridge events stay far below it (EventBridge caps
# events at 256 KiB); a larger body is dead-lettered with its size rather than parsed into memory.
MAX_BODY_BYTES = 1024 * 1024


class CommandFactory:
    def __init__(self, commands: Iterable[type[Command]]) -> None:
        self._models = {c.TYPE: c for c in commands}

    @property
    def types(self) -> list[str]:
        return sorted(self._models)

    def decode(self, message: Message) -> Command:
        """The command, or one DecodeError naming the problem - whatever the body holds.

        Any exception while decoding (a validator's TypeError, a RecursionError on deep nesting, an
        OverflowError) is a property of the message, not of the moment, so it is a DecodeError too:
        retrying it could only fail the same way.
        """
        if len(message.body) > MAX_BODY_BYTES:
            raise DecodeError(f"body is {len(message.body):,} bytes; the limit is {MAX_BODY_BYTES:,}")
        try:
            return self._decode(message)
        except DecodeError:
            raise
        except RecursionError:
            raise DecodeError("body is nested too deeply") from None
        except Exception as exc:
            type_name = message.attributes.get(TYPE_ATTR) or "message"
            raise DecodeError(f"{type_name}: {type(exc).__name__}: {exc}"[:500]) from exc

    def _decode(self, message: Message) -> Command:
        context = {RECEIVED: _received(message)}
        type_name = message.attributes.get(TYPE_ATTR)
        if type_name:
            model = self._model(type_name)
            try:
                return model.model_validate_json(message.body, context=context)
            except ValidationError as exc:
                raise DecodeError(describe(type_name, exc)) from None
        data = self._object(message.body)
        type_name = next((t for t, matches in SHAPES.items() if matches(data)), None)
        if type_name is None:
            raise DecodeError(
                "no 'type' attribute, and the payload's keys match no known source "
                "(Alertmanager: version+groupKey+alerts; OEC: action+alert; EventBridge: source+detail-type)"
            )
        try:
            return self._model(type_name).model_validate(data, context=context)
        except ValidationError as exc:
            raise DecodeError(describe(type_name, exc)) from None

    def _model(self, type_name: str) -> type[Command]:
        try:
            return self._models[type_name]
        except KeyError:
            raise DecodeError(
                f"unknown command type {type_name!r} (known: {', '.join(self.types)})"
            ) from None

    @staticmethod
    def _object(body: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DecodeError(f"body is a JSON {type(data).__name__}, not an object")
        return data


def _received(message: Message) -> datetime:
    """The time event times are judged against: the broker's publish time, unless the publisher set a
    timestamp that is itself implausible (a bogus one must not make every event look wrong): then now."""
    now, published = datetime.now(UTC), message.publish_time
    if published is not None and published.tzinfo is not None and now - PAST <= published <= now + FUTURE:
        return published
    return now


def describe(type_name: str, exc: ValidationError) -> str:
    """``alertmanager.webhook: alerts.0.fingerprint: Field required`` - one clause per failing path."""
    clauses = []
    for error in exc.errors(include_url=False)[:_MAX_ERRORS]:
        if error["type"] == "json_invalid":
            return f"{type_name}: body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
        if error["type"] == "model_type" and not error["loc"]:
            return f"{type_name}: body is not a JSON object"
        path = ".".join(str(part) for part in error["loc"]) or "(body)"
        clauses.append(f"{path}: {error['msg']}")
    more = exc.error_count() - _MAX_ERRORS
    if more > 0:
        clauses.append(f"and {more} more")
    return f"{type_name}: " + "; ".join(clauses)
