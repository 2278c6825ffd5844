"""Moved to ``infra.memory.dead_letters`` (the memory broker's own); this name stays for callers not yet
moved (the container)."""

from infra.memory.dead_letters import MemoryDeadLetters as SqliteDeadLetters

__all__ = ["SqliteDeadLetters"]
