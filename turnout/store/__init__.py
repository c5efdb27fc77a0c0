"""The store: SQLAlchemy 2 (async) on SQLite by default, PostgreSQL by URL."""

from turnout.store.db import is_store_outage, is_unavailable, upgrade, upgrade_async
from turnout.store.fleet import HostClaimed
from turnout.store.repo import Conflict, NotFound, Store, StoreError

__all__ = ["Conflict", "HostClaimed", "NotFound", "Store", "StoreError", "is_store_outage",
           "is_unavailable", "upgrade", "upgrade_async"]
