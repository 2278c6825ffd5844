"""The configuration reference, docs/configuration.md, generated from the settings model so that no
setting is ever undocumented: ``python -m config.docs > docs/configuration.md``.
tests/unit/test_settings_docs.py fails when the file is out of date or a setting has no description.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from config.settings import ENV_PREFIX, Settings
from config.views import VIEWS, setting_name

# View attribute -> (section title, when it applies, where it is explained, the pip extra it needs).
SECTIONS: dict[str, tuple[str, str, str, str]] = {
    "postgres": ("PostgreSQL store", "With `store=postgres`.", "incidents.md", "postgres"),
    "rabbitmq": ("RabbitMQ", "With `broker=rabbitmq`.", "rabbitmq.md", "rabbitmq"),
    "pubsub": ("Google Pub/Sub", "With `broker=pubsub`.", "pubsub.md", "pubsub"),
    "kubernetes": ("Kubernetes adapter", "", "adapters.md#kubernetes", "kubernetes"),
    "aws": ("AWS adapter", "", "adapters.md#aws", "aws"),
    "clickhouse": ("ClickHouse event lake", "", "adapters-lake-github-slack.md", "clickhouse"),
    "github": ("GitHub issues", "", "adapters-lake-github-slack.md", "github"),
    "slack": ("Slack notifications", "", "adapters-lake-github-slack.md", ""),
    "ai": (
        "AI analysis",
        "Needs the `ai` extra (`pip install 'incidentd[ai]'`); `ai_provider=bedrock` also the `aws` extra.",
        "ai.md",
        "",
    ),
    "ops": ("Ops server", "Probes and metrics.", "operations.md", ""),
    "http": ("HTTP ingest, incident API and dashboard", "", "ingest.md", ""),
    "maintenance": ("Retention and archival", "", "operations.md#retention-and-archival", ""),
}

INTRO = f"""\
# Configuration reference

<!-- Generated from config/settings.py by `python -m config.docs > docs/configuration.md`; do not edit.
     tests/unit/test_settings_docs.py fails when this file is out of date. -->

Every setting is an environment variable `{ENV_PREFIX}<NAME>`, a file of that name (any case) in
`{ENV_PREFIX}SECRETS_DIR`, or a key `<name>` (lower case) in the JSON file given with `--config FILE`; in
that order of precedence, over the defaults. Lists and maps are JSON in the environment
(`{ENV_PREFIX}RETRY_BACKOFF='[1, 5, 30]'`). Every problem is reported at start-up, one line each (see the
README's Configuration section); `python app.py config show` prints the effective values and where each
came from. A feature whose client library is a pip extra stops start-up with one line naming the extra
when it is enabled but not installed.

Inside incidentd, each adapter reads its section as one typed view (`settings.<view>`,
config/views.py).
"""


_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path", SecretStr: "secret"}


def _plain(annotation: Any, plural: bool = False) -> str:
    """A type as a reader of the environment sees it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_plain(a) if a is not type(None) else "unset" for a in args)
    if origin is list:
        return f"JSON list of {_plain(args[0], plural=True)}"
    if origin is dict:
        return f"JSON map of {_plain(args[1], plural=True)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{annotation.__name__} objects"
    name = _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return f"{name}s" if plural else name


def _bounds(field: FieldInfo) -> str:
    words = {
        annotated_types.Ge: ("≥", "ge"),
        annotated_types.Gt: (">", "gt"),
        annotated_types.Le: ("≤", "le"),
        annotated_types.Lt: ("<", "lt"),
        annotated_types.MinLen: ("at least", "min_length"),
    }
    parts = []
    for item in field.metadata:
        for kind, (word, attribute) in words.items():
            if isinstance(item, kind):
                parts.append(f"{word} {_number(getattr(item, attribute))}")
    return ", ".join(parts)


def _number(value: Any) -> Any:
    """30.0 reads as 30, also inside a list."""
    if isinstance(value, list):
        return [_number(item) for item in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _type(field: FieldInfo) -> str:
    bounds = _bounds(field)
    return f"{_plain(field.annotation)}{f', {bounds}' if bounds else ''}"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, str | Path):
        return f"`{value}`"
    return f"`{json.dumps(_number(value))}`"


def _row(name: str) -> str:
    field = Settings.model_fields[name]
    description = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{ENV_PREFIX}{name.upper()}` | {_type(field)} | {_default(field)} | {description} |"


def sections() -> dict[str, list[str]]:
    """View attribute (or "core") -> the settings documented under it. A setting that exactly one view
    reads is documented there; the rest (shared like dry_run, or in no view) under core."""
    readers: dict[str, list[str]] = {}
    for attribute, (view, prefix) in VIEWS.items():
        for view_field in dataclasses.fields(view):
            readers.setdefault(setting_name(view_field, prefix), []).append(attribute)
    placed: dict[str, list[str]] = {"core": [], **{attribute: [] for attribute in VIEWS}}
    for name in Settings.model_fields:
        views = readers.get(name, [])
        placed[views[0] if len(views) == 1 else "core"].append(name)
    return placed


def _section(title: str, intro: str, names: list[str]) -> Iterator[str]:
    yield f"## {title}"
    yield ""
    if intro:
        yield intro
        yield ""
    yield "| setting | type | default | description |"
    yield "| --- | --- | --- | --- |"
    yield from (_row(name) for name in names)
    yield ""


def render() -> str:
    placed = sections()
    lines = [INTRO]
    core = (
        "Broker and store, the dispatcher, logging, incidents and action rules "
        "([adapters.md](adapters.md#action-rules)). No extra needed."
    )
    lines += _section("Core", core, placed["core"])
    for attribute, (title, when, doc, extra) in SECTIONS.items():
        needs = f"Needs the `{extra}` extra (`pip install 'incidentd[{extra}]'`)." if extra else ""
        explained = f"View: `settings.{attribute}`. Explained in [{doc}]({doc})."
        intro = " ".join(part for part in (when, needs, explained) if part)
        lines += _section(title, intro, placed[attribute])
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
