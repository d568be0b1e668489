"""Users, API keys and exact per-user RPM/TPM limits.

``store`` defines the store interface and the admission rules, ``redis_store`` and
``embedded_store`` implement it, ``limiter`` is the gateway's hot path, ``api`` the user API
and ``service`` the Serve deployment that answers it.
"""

from __future__ import annotations

from serve_apps.config import UsersConfig
from serve_apps.users.store import UserStore


def open_store(settings: UsersConfig) -> UserStore:
    """The store the settings name: Redis for a URL, else the embedded SQLite file."""
    if settings.store == "embedded":
        from rayfleet.stack import rayfleet_home
        from serve_apps.users.embedded_store import EmbeddedUserStore

        path = settings.embedded_path or rayfleet_home() / "users.sqlite3"
        return EmbeddedUserStore(path, timeout_s=settings.store_timeout_s)
    from serve_apps.users.redis_store import RedisUserStore

    return RedisUserStore(settings.store, timeout_s=settings.store_timeout_s)
