"""The ledger and everything else the service keeps: which store, by the settings."""

from __future__ import annotations

from config import Settings
from stores.interface import Store


def open_store(settings: Settings) -> Store:
    """PostgreSQL with DATABASE_URL; else Redis with REDIS_URL; else the SQLite file (DATABASE_PATH)."""
    if settings.postgres_url:
        from stores.postgres import PostgresStore

        return PostgresStore(settings.postgres_url, settings.history_ttl, settings.history_max_users)
    if settings.redis_url:
        from stores.redis import RedisStore

        return RedisStore(settings.redis_url, settings.history_ttl)
    from stores.sqlite import SqliteStore

    shared = settings.web_concurrency > 1  # several workers on one file: ends are also written for the others
    return SqliteStore(settings.database_path, settings.history_ttl, settings.history_max_users, shared=shared)
