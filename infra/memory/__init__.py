"""The embedded broker: an in-process queue with delayed redelivery and a dead-letter store.

It has the same subscriber / publisher shape as the RabbitMQ and Pub/Sub packages, so the core and the
broker contract suite run on it with no server. Messages live in the process: what is still queued when
the process stops is gone, which is why ``worker --from`` runs until the queue is drained. Dead letters
persist (SQLite), so ``dlq list`` shows them after the run.
"""

from infra.memory.broker import MemoryBroker

__all__ = ["MemoryBroker"]
