"""The embedded SQLite store (aiosqlite): incidents and, for the memory broker, dead letters."""
