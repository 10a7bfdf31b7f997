"""The ledger and everything else the service keeps: which store, by the settings."""

from __future__ import annotations

from config import Settings
from stores.interface import Store


def open_store(settings: Settings) -> Store:
    """Redis with REDIS_URL; otherwise the SQLite file at DATABASE_PATH."""
    if settings.redis_url:
        from stores.redis import RedisStore

        return RedisStore(settings.redis_url, settings.history_ttl)
    from stores.sqlite import SqliteStore

    return SqliteStore(settings.database_path, settings.history_ttl, settings.history_max_users)
