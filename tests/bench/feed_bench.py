"""``worker --from`` on a large file: wall time, messages per second and the process's peak RSS.

    python tests/bench/feed_bench.py [--lines 50000] [--keys 5000]

Writes ``--lines`` incident.create envelopes (``--keys`` dedup keys, so most lines count occurrences on
an open incident) to a temporary file, feeds it once into a fresh SQLite store, and prints the numbers.
The peak RSS is the child's own (``ru_maxrss`` of the waited-for child): the file is streamed, so it
should not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp) / "feed.jsonl"
        with feed.open("w") as f:
            for n in range(args.lines):
                data = {"title": f"t{n}", "service": f"s{n % 50}", "environment": "prod",
                        "dedup_key": f"k{n % args.keys}", "actor": "bench"}  # fmt: skip
                f.write(json.dumps({"type": "incident.create", "data": data}) + "\n")
        size = feed.stat().st_size
        env = {k: v for k, v in os.environ.items() if not k.startswith("INCIDENTD_")}
        env |= {"INCIDENTD_SQLITE_PATH": str(Path(tmp) / "bench.db"), "INCIDENTD_LOG_LEVEL": "warning"}
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "worker", "--from", str(feed), "--limit", "0"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(result.stdout.splitlines()[0])
    print(f"lines {args.lines:,}  file {size / 1e6:.1f} MB")
    print(f"wall {seconds:.1f} s  {args.lines / seconds:,.0f} msgs/s  peak RSS {rss_mb:.1f} MB  "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
