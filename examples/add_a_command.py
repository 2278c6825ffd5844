"""Adding a command to incidentd: a model, a handler, one registration.

Run it:  python examples/add_a_command.py
It opens an incident, then feeds a `maintenance.window` message that notes the window on every open
incident of the service, and prints the incident's timeline.

In the project itself the three steps are: the model in application/commands.py, the handler in a module
of application/handlers/, and one line in HANDLERS in application/handlers/__init__.py. This example does
the same from outside the package by overriding the container's `handlers` provider.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dependency_injector import providers  # noqa: E402

from application.commands import Command  # noqa: E402
from application.dispatcher import Context  # noqa: E402
from application.handlers import HANDLERS  # noqa: E402
from application.ports import IncidentStore  # noqa: E402
from application.worker import run_worker  # noqa: E402
from config.container import Container  # noqa: E402
from config.settings import load  # noqa: E402


# 1. The model: what the message's JSON must hold. TYPE is the value of the `type` attribute.
class MaintenanceWindow(Command):
    TYPE = "maintenance.window"

    service: str
    starts_at: datetime
    ends_at: datetime
    reason: str = ""


# 2. The handler: the command, its context, and the dependencies it names (here: the store).
async def note_maintenance(cmd: MaintenanceWindow, ctx: Context, store: IncidentStore) -> None:
    async with store.transaction(ctx.idempotency_key) as tx:
        if tx.already_processed:
            return
        for found in await store.list(status="open", service=cmd.service):
            incident = await tx.get(found.id)
            if incident is not None:
                note = f"maintenance {cmd.starts_at:%H:%M}-{cmd.ends_at:%H:%M} UTC: {cmd.reason}"
                incident.add_note(note=note, at=cmd.starts_at, actor="maintenance", message_id=ctx.message_id)
                await tx.update(incident)


# 3. The registration.
MY_HANDLERS = {**HANDLERS, MaintenanceWindow: [note_maintenance]}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        container = Container(settings=load(sqlite_path=Path(tmp) / "example.db", log_level="warning"))
        container.handlers.override(providers.Object(MY_HANDLERS))
        container.logging()
        broker = await container.broker()
        dispatcher = await container.dispatcher()
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(broker.subscriber, dispatcher, stop=stop, shutdown_timeout=5))
        publish = broker.publisher.publish
        await publish(b'{"title": "Checkout latency", "service": "checkout"}', {"type": "incident.create"})
        await broker.wait_idle()  # the create first, so the window finds the incident
        await publish(
            b'{"service": "checkout", "starts_at": "2026-11-23T22:00:00Z", "ends_at": "2026-11-23T23:00:00Z",'
            b' "reason": "database failover drill"}',
            {"type": "maintenance.window"},
        )
        await broker.wait_idle()
        stop.set()
        await worker
        store = await container.store()
        for incident in await store.list():
            print(incident.title)
            for entry in incident.timeline:
                print(f"  {entry.kind:10} {entry.actor:12} {entry.note}")
        await container.shutdown_resources()


if __name__ == "__main__":
    asyncio.run(main())
