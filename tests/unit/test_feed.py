"""The `worker --from` line format: every line is one message or one feed error, never an exception."""

from __future__ import annotations

import base64
import io
import json

import pytest

from infra.memory.feed import MAX_LINE, parse, read_lines


def test_an_envelope_with_data_base64_carries_the_exact_bytes_and_string_attributes():
    """`data_base64` is the body byte for byte; attributes arrive as written; `type` joins them."""
    body = b'{"a": 1, "a": 2}\x00\xff'
    line = json.dumps(
        {
            "type": "t",
            "attributes": {"k": "true"},
            "data_base64": base64.b64encode(body).decode(),
            "id": "m-1",
        }
    ).encode()
    fed = parse(line)
    assert fed is not None and not fed.problem
    assert (fed.body, fed.attributes, fed.message_id) == (body, {"k": "true", "type": "t"}, "m-1")


def test_an_empty_body_can_be_fed():
    """`"data_base64": ""` is an empty body (dead-lettered by the factory with its reason, not skipped)."""
    fed = parse(b'{"type": "incident.create", "data_base64": ""}')
    assert fed is not None and fed.body == b"" and not fed.problem


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ({"data": {}, "attributes": {"flag": True}}, "attribute 'flag' must be a string, not bool"),
        ({"data": {}, "attributes": {"n": 1}}, "attribute 'n' must be a string, not int"),
        ({"data": {}, "attributes": ["x"]}, "attributes must be an object"),
        ({"data": {}, "data_base64": ""}, "not both"),
        ({"data_base64": "***"}, "not base64"),
        ({"data": {}, "type": 5}, "type must be a non-empty string"),
        ({"data": {}, "attributes": {"x-incidentd-attempt": "1e309"}}, "x-incidentd-attempt"),
        ({"data": {}, "attributes": {"x-incidentd-attempt": "1.5"}}, "x-incidentd-attempt"),
        ({"data": {}, "attributes": {"x-incidentd-attempt": "9" * 40}}, "x-incidentd-attempt"),
        ({"data": {}, "attributes": {"x-incidentd-first-seen": "garbage"}}, "x-incidentd-first-seen"),
        ({"data": {}, "id": ""}, "id must be"),
    ],
)
def test_an_envelope_that_breaks_the_format_is_a_feed_error_naming_the_rule(envelope, problem):
    """No guessing: the line becomes a dead letter whose reason names the broken rule, body the line."""
    line = json.dumps(envelope).encode()
    fed = parse(line)
    assert fed is not None and problem in fed.problem and fed.body == line


@pytest.mark.parametrize(
    "line", [b"not json", b"[1, 2]", b'{"a": 1}', b"\xff\xfe", b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}"]
)
def test_any_other_line_is_the_body_itself(line):
    """Non-JSON, non-envelope, invalid UTF-8, too deep, too many digits: published as they are."""
    fed = parse(line + b"\n")
    assert fed is not None and fed.body == line and fed.attributes == {} and not fed.problem


def test_the_message_id_is_stable_per_line_and_blank_lines_are_skipped():
    """The same line always has the same id (so a second feed is a redelivery); blank lines are no message."""
    first, again, other = parse(b'{"a": 1}\n'), parse(b'{"a": 1}\r\n'), parse(b'{"a": 2}\n')
    assert first is not None and again is not None and other is not None
    assert first.message_id == again.message_id != other.message_id
    assert parse(b"  \n") is None


def test_an_over_long_line_is_cut_and_the_next_line_still_read():
    """A line over MAX_LINE is not held whole: it comes back cut (the factory dead-letters it for its
    size), and the line after it is read normally."""
    stream = io.BytesIO(b"x" * (MAX_LINE + 10) + b"\n" + b"next\n")
    lines = read_lines(stream, 10)
    assert [len(x) for x in lines] == [MAX_LINE, 5]
