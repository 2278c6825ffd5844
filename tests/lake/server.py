"""A throw-away ClickHouse server: Debian's ``clickhouse-server`` with its config, data and logs in a temp
dir, listening on 127.0.0.1 only, on free ports (never the default 9000/8123, which other processes on
the machine may hold). Used by tests/lake and tests/bench."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/error.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <max_concurrent_queries>20</max_concurrent_queries>
</yandex>
"""
_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default/></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default/></quotas>
</yandex>
"""


def binary() -> str | None:
    """Debian ships ``clickhouse-server``; upstream packages ship one ``clickhouse`` multi-call binary."""
    return shutil.which("clickhouse-server") or shutil.which("clickhouse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClickHouseServer:
    host = "127.0.0.1"

    def __init__(self, executable: str) -> None:
        self._argv = [executable] if executable.endswith("-server") else [executable, "server"]
        self._dir = Path(tempfile.mkdtemp(prefix="incidentd-clickhouse-"))
        self.tcp_port = free_port()
        self.http_port = free_port()
        (self._dir / "config.xml").write_text(
            _CONFIG.format(d=self._dir, tcp=self.tcp_port, http=self.http_port)
        )
        (self._dir / "users.xml").write_text(_USERS)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._proc = subprocess.Popen(
            [*self._argv, f"--config-file={self._dir / 'config.xml'}"],
            cwd=self._dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self._dir / "log" / "error.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                self.stop()
                raise RuntimeError(f"clickhouse-server did not start on {self.tcp_port}: {tail}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/ping", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def version(self) -> str:
        return self.query("SELECT version()").strip()

    def query(self, sql: str) -> str:
        """Run SQL over the HTTP interface, independent of the native-protocol client under test."""
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}/", data=sql.encode())
        with urllib.request.urlopen(request, timeout=10) as r:
            return str(r.read().decode())

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, then nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def remove(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)
