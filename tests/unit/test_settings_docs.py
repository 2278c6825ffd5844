"""docs/configuration.md is generated from the settings model, so no setting is ever undocumented."""

from __future__ import annotations

import re
from pathlib import Path

from config import docs
from config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"


def test_the_configuration_reference_is_up_to_date() -> None:
    """docs/configuration.md is what `python -m config.docs` renders now: a setting added, removed or
    redescribed without regenerating it fails here."""
    assert REFERENCE.read_text() == docs.render(), (
        "docs/configuration.md is out of date: run `python -m config.docs > docs/configuration.md`"
    )


def test_every_setting_has_a_description() -> None:
    """Each setting says what it does in the model itself, the one place the reference comes from."""
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert missing == []


def test_every_setting_appears_once_in_the_reference() -> None:
    """Each INCIDENTD_* name is one row of the reference, with its default, under one section."""
    text = REFERENCE.read_text()
    for name in Settings.model_fields:
        assert text.count(f"| `INCIDENTD_{name.upper()}` |") == 1, name
    placed = docs.sections()
    assert sorted(n for names in placed.values() for n in names) == sorted(Settings.model_fields)


def test_the_readme_links_the_reference() -> None:
    """The README's configuration section points at the full reference."""
    assert "docs/configuration.md" in (ROOT / "README.md").read_text()


def test_every_setting_the_docs_name_exists() -> None:
    """A renamed or removed setting cannot linger in the README or docs/: every INCIDENTD_* name there is
    a setting, except the README's misspelt example, Kubernetes' service-link variables and the test
    suite's own INCIDENTD_TEST_*."""
    settings = {f"INCIDENTD_{name.upper()}" for name in Settings.model_fields}
    not_settings = re.compile(r"INCIDENTD_(CONCURENCY|METRICS_(SERVICE_HOST|PORT\w*)|TEST[\w*]*)$")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # INCIDENTD_PUBSUB_* names a group: some setting must start with it
        named = set(re.findall(r"INCIDENTD_[A-Z0-9_]*[A-Z0-9](?:_\*)?", path.read_text()))
        unknown = {name for name in named - settings if not not_settings.match(name)}
        groups = {name for name in unknown if name.endswith("_*")}
        unknown -= {name for name in groups if any(s.startswith(name[:-1]) for s in settings)}
        assert unknown == set(), f"{path.name} names settings that do not exist: {sorted(unknown)}"
