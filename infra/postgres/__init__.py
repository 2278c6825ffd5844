"""Incidents in PostgreSQL (asyncpg pool; schema from versioned SQL migrations)."""
