"""The official Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator, Java) on a free
loopback port, for the tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "google-cloud-cli-pubsub-emulator"
KNOWN_PATH = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
START_WITH = "bash .ci/install-pubsub.sh"


def launcher() -> Path | None:
    """The emulator's launcher script, if the package (and Java) are installed."""
    if shutil.which("java") is None:
        return None
    if KNOWN_PATH.exists():
        return KNOWN_PATH
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, timeout=10)
        for line in listing.stdout.splitlines():
            if line.endswith("bin/cloud-pubsub-emulator"):
                return Path(line)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def running(script: Path, *, timeout: float = 60.0) -> Iterator[str]:
    """Start the emulator (in memory) in a process group of its own; yield ``host:port``; kill the whole
    group at the end (the launcher script starts java as a child)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="pubsub-emulator-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [str(script), "--host=127.0.0.1", f"--port={port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Pub/Sub emulator did not start on port {port}: "
                    + Path(log.name).read_text()[-2000:]
                )
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
        os.unlink(log.name)
