"""HTTP ingest benchmark on RabbitMQ: (A) a minimal aiohttp handler that publishes with confirms vs (B)
``python app.py ingest``.

    python tests/bench/ingest_bench.py [--seconds 10] [--rounds 3] [--log-level info] [--baseline DIR]

Alternates A B A B A B; each run is a fresh server process. The load generator (this process) posts
Alertmanager webhooks of 10 alerts (~4.5 KB) from 64 concurrent keep-alive clients:
  1. closed loop for ``--seconds``: requests/s, alerts/s, p50/p99 latency at full load;
  2. open loop at 500 requests/s for ``--seconds``: p50/p99 latency at that rate.
CPU seconds per 10k requests and peak RSS (VmHWM) are the server process's own, from /proc.

(A) aiohttp, one route: read the body, ``exchange.publish(..., mandatory=True)`` on a confirming
    aio-pika channel, answer 202. No validation, no auth, no id derivation, no metrics, no log line.
(B) ``app.py ingest``: bearer token check, rate limiter (set to 0: off), size and read-timeout limits,
    validation by the worker's factory, stable message id, publish with confirm under a timeout,
    metrics and one JSON log line per request (to /dev/null; ``--log-level warning`` drops it).

Both publish to the same exchange and quorum queue (incidentd's topology, purged after each run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
URL = os.environ.get("INCIDENTD_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
CLIENTS = 64
RATE = 500
TOKEN = "bench-token-0123456789abcdef"

from tests.workers import free_port  # noqa: E402


def webhook(seq: int) -> bytes:
    alerts = [
        {
            "status": "firing",
            "labels": {
                "alertname": "HighLatency",
                "service": "checkout",
                "env": "production",
                "severity": "high",
                "instance": f"checkout-{seq}-{i}",
                "namespace": "shop",
            },
            "annotations": {
                "summary": f"p99 latency above SLO on checkout-{seq}-{i}",
                "runbook_url": "https://runbooks.example.com/checkout/latency",
            },
            "startsAt": "2026-11-23T10:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.monitoring.svc:9090/graph?g0.expr=histogram_quantile",
            "fingerprint": f"{seq:08x}{i:08x}",
        }
        for i in range(10)
    ]
    doc = {"version": "4", "groupKey": f'{{}}:{{alertname="HighLatency", seq="{seq}"}}', "truncatedAlerts": 0,
           "status": "firing", "receiver": "incidentd", "groupLabels": {"alertname": "HighLatency"},
           "commonLabels": {"alertname": "HighLatency"}, "commonAnnotations": {},
           "externalURL": "http://alertmanager:9093", "alerts": alerts}  # fmt: skip
    return json.dumps(doc).encode()


# --- side A: the minimal server (a child process) ----------------------------------------------------


async def serve_a(port: int, exchange_name: str) -> None:
    import aio_pika
    from aiohttp import web

    connection = await aio_pika.connect_robust(URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.get_exchange(exchange_name, ensure=False)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        message_id = uuid.uuid4().hex
        await exchange.publish(
            aio_pika.Message(body, headers={"type": "alertmanager.webhook"}, message_id=message_id),
            routing_key="alertmanager.webhook", mandatory=True,
        )  # fmt: skip
        return web.json_response({"message_id": message_id}, status=202)

    app = web.Application(client_max_size=5 * 1024 * 1024)
    app.router.add_post("/v1/alertmanager", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await connection.close()


# --- the parent: topology, server processes, load -----------------------------------------------------


def start(
    side: str, port: int, names: dict[str, str], tokens: Path, log_level: str, baseline: Path | None = None
) -> subprocess.Popen[bytes]:
    """Side A, B (this checkout's ``app.py ingest``) or B0 (``baseline``'s, e.g. ``git worktree add
    /tmp/main main``: before/after in the same run)."""
    if side == "A":
        argv = [sys.executable, __file__, "--serve-a", str(port), "--exchange", names["rabbitmq_exchange"]]
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = os.environ | {
        "INCIDENTD_BROKER": "rabbitmq",
        "INCIDENTD_RABBITMQ_URL": URL,
        "INCIDENTD_RABBITMQ_EXCHANGE": names["rabbitmq_exchange"],
        "INCIDENTD_RABBITMQ_QUEUE": names["rabbitmq_queue"],
        "INCIDENTD_HTTP_HOST": "127.0.0.1",
        "INCIDENTD_HTTP_PORT": str(port),
        "INCIDENTD_HTTP_TOKENS_FILE": str(tokens),
        "INCIDENTD_HTTP_RATE_LIMIT": "0",
        "INCIDENTD_OPS_ENABLED": "false",
        "INCIDENTD_LOG_LEVEL": log_level,
    }
    cwd = baseline if side == "B0" and baseline is not None else ROOT
    return subprocess.Popen([sys.executable, "app.py", "ingest"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(url: str, seconds: float, rate: float | None) -> tuple[float, list[float], int]:
    """(202 answers per second of wall time, their latencies in s, errors) over ``seconds``: closed loop,
    or ``rate`` requests/s offered (a client that falls behind sends its next request at once)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    seq = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal seq, errors
            seq += 1
            body = webhook(seq)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status == 202:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        async def client(offset: float) -> None:
            if rate is None:
                while loop.time() < end:
                    await one()
                return
            interval = CLIENTS / rate  # each client sends every `interval` s, staggered
            due = loop.time() + offset * interval
            while due < end:
                await asyncio.sleep(max(0.0, due - loop.time()))
                await one()
                due += interval

        began = loop.time()
        await asyncio.gather(*(client(i / CLIENTS) for i in range(CLIENTS)))
        elapsed = loop.time() - began
    return len(latencies) / elapsed, latencies, errors


async def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            sys.exit("the server exited at start-up")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    sys.exit("the server did not listen within 30 s")


async def one_run(
    side: str, names: dict[str, str], tokens: Path, args: argparse.Namespace
) -> dict[str, float]:
    port = free_port()
    process = start(side, port, names, tokens, args.log_level, args.baseline)
    try:
        await wait_listening(port, process)
        url = f"http://127.0.0.1:{port}/v1/alertmanager"
        await load(url, 1.0, None)  # warm-up
        cpu0 = cpu_seconds(process.pid)
        rps, latencies, errors = await load(url, args.seconds, None)
        cpu = cpu_seconds(process.pid) - cpu0
        rate_rps, at_rate, rate_errors = await load(url, args.seconds, RATE)
        rss = peak_rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    await purge(names["rabbitmq_queue"])
    q = statistics.quantiles
    result = {
        "rps": rps, "alerts": rps * 10,
        "p50": q(latencies, n=100)[49] * 1000, "p99": q(latencies, n=100)[98] * 1000,
        "rate_rps": rate_rps,
        "rate_p50": q(at_rate, n=100)[49] * 1000, "rate_p99": q(at_rate, n=100)[98] * 1000,
        "cpu_per_10k": cpu / len(latencies) * 10_000, "rss": rss, "errors": errors + rate_errors,
    }  # fmt: skip
    print(f"  {side}: {result['rps']:6.0f} req/s  p50 {result['p50']:5.1f} ms  p99 {result['p99']:5.1f} ms  "
          f"@{RATE}/s p99 {result['rate_p99']:5.1f} ms  {result['cpu_per_10k']:.2f} CPU s/10k  "
          f"{rss:.1f} MB  errors {result['errors']:.0f}", flush=True)  # fmt: skip
    return result


async def purge(queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await (await channel.get_queue(queue, ensure=False)).purge()


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def main(args: argparse.Namespace) -> None:
    from config.settings import load as load_settings
    from infra.rabbitmq import open_broker
    from infra.rabbitmq.topology import Topology
    from tests.rabbitmq.conftest import delete_topology

    suffix = uuid.uuid4().hex[:8]
    names = {"rabbitmq_exchange": f"bench-ingest-{suffix}", "rabbitmq_queue": f"bench-ingest-{suffix}"}
    settings = load_settings(broker="rabbitmq", rabbitmq_url=URL, **names)
    async with open_broker(settings) as broker:
        await broker.setup()
    tokens = Path(f"/tmp/ingest-bench-tokens-{suffix}")
    write(tokens, f"bench:{TOKEN}\n")
    sides = ("A", "B0", "B") if args.baseline else ("A", "B")
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    args.load_before = os.getloadavg()[0]
    try:
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}", flush=True)
            for side in sides:
                results[side].append(await one_run(side, names, tokens, args))
    finally:
        os.unlink(tokens)
        await delete_topology(Topology.from_settings(settings))
    summarise(results, args)


def summarise(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    command = f"python tests/bench/ingest_bench.py --seconds {args.seconds:g} --rounds {args.rounds}"
    if args.baseline:
        command += f" --baseline {args.baseline}"
    print(f"\n`{command}` on {os.cpu_count()} cores, load average {args.load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after (1 min)")  # fmt: skip
    print(f"Ingest on RabbitMQ, {CLIENTS} keep-alive clients, 10 alerts per request, "
          f"{args.seconds:g} s runs, {args.rounds} rounds (medians; RSS: max)\n")  # fmt: skip
    print("| side | req/s | alerts/s | p50 ms | p99 ms | at 500 req/s offered: achieved, p50 / p99 ms "
          "| CPU s / 10k req | peak RSS MB |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    labels = {"A": "A minimal aiohttp + confirm", "B0": f"B0 app.py ingest of {args.baseline}",
              "B": "B app.py ingest"}  # fmt: skip
    for side in results:
        label = labels[side]
        rss = max(r["rss"] for r in results[side])
        print(f"| {label} | {med(side, 'rps'):,.0f} | {med(side, 'alerts'):,.0f} | {med(side, 'p50'):.1f} | "
              f"{med(side, 'p99'):.1f} | {med(side, 'rate_rps'):,.0f}, {med(side, 'rate_p50'):.1f} / "
              f"{med(side, 'rate_p99'):.1f} | "
              f"{med(side, 'cpu_per_10k'):.2f} | {rss:.1f} |")  # fmt: skip
    ratio = med("B", "rps") / med("A", "rps")
    cpu = med("B", "cpu_per_10k") / med("A", "cpu_per_10k")
    print(f"\nB/A = {ratio:.2f} req/s (target >= 0.9); B/A = {cpu:.2f} CPU per request; "
          f"B p99 at {RATE} req/s = {med('B', 'rate_p99'):.1f} ms (target <= 50 ms)")  # fmt: skip
    if "B0" in results:
        print(f"B0/A = {med('B0', 'rps') / med('A', 'rps'):.2f} req/s; "
              f"B0/A = {med('B0', 'cpu_per_10k') / med('A', 'cpu_per_10k'):.2f} CPU per request")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--baseline", type=Path, help="also run B0: the app.py ingest of this checkout")
    parser.add_argument("--serve-a", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--exchange", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_a:
        asyncio.run(serve_a(parsed.serve_a, parsed.exchange))
    else:
        asyncio.run(main(parsed))
