"""The embedded store for ``rayfleet up`` without Redis: one SQLite file on local disk.

Users, keys and windows live in the same file, so users and keys survive a restart, and
every process on the machine that opens it (the gateway replicas, the user service) shares
one set of limits: admission is one ``BEGIN IMMEDIATE`` transaction, which SQLite
serialises across processes. It is a single-node store: gateway replicas on other nodes
cannot see the file; use Redis there.

Calls are synchronous (SQLite is in-process and an admission is tens of microseconds);
``busy_timeout`` bounds the wait for another process's transaction, and a timeout is a
``StoreError`` like a Redis outage.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from rayfleet.protocol.users import ApiKeyInfo, User, WindowUsage
from serve_apps.users.store import WINDOW_S, Admission, Identity, StoreError, effective_limits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, rpm INTEGER NOT NULL, tpm INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY, id TEXT NOT NULL, user TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user, id);
CREATE TABLE IF NOT EXISTS admissions (user TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS admissions_user_at ON admissions (user, at);
CREATE TABLE IF NOT EXISTS charges (
    user TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (user, id));
CREATE INDEX IF NOT EXISTS charges_user_at ON charges (user, at);
CREATE TABLE IF NOT EXISTS window_totals (
    user TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0);
"""


class EmbeddedUserStore:
    """``UserStore`` on a local SQLite file (WAL mode, so readers never wait for writers)."""

    def __init__(self, path: str | Path, timeout_s: float = 0.25, window_s: float = WINDOW_S) -> None:
        self.path = Path(path)
        self.window_s = window_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a committed user survives a process crash
        self._db.executescript(_SCHEMA)

    def _transaction(self, work):  # type: ignore[no-untyped-def]
        """Run ``work(cursor)`` in one immediate transaction; SQLite failures become StoreError."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise StoreError(f"user store {self.path}: {exc}") from None

    # -- users -------------------------------------------------------------------------
    async def create_user(self, user: User) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute("INSERT OR IGNORE INTO users VALUES (?, ?, ?)", (user.name, user.rpm, user.tpm))
            return cursor.rowcount == 1

        return self._transaction(work)

    async def get_user(self, name: str) -> User | None:
        row = self._transaction(lambda db: db.execute("SELECT rpm, tpm FROM users WHERE name = ?", (name,)).fetchone())
        return None if row is None else User(name=name, rpm=row[0], tpm=row[1])

    async def update_user(self, user: User) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute("UPDATE users SET rpm = ?, tpm = ? WHERE name = ?", (user.rpm, user.tpm, user.name))
            return cursor.rowcount == 1

        return self._transaction(work)

    async def delete_user(self, name: str) -> User | None:
        def work(db: sqlite3.Connection) -> User | None:
            row = db.execute("SELECT rpm, tpm FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            for table, column in (("users", "name"), ("api_keys", "user"), ("admissions", "user"),
                                  ("charges", "user"), ("window_totals", "user")):  # fmt: skip
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))
            return User(name=name, rpm=row[0], tpm=row[1])

        return self._transaction(work)

    async def list_users(self) -> list[User]:
        rows = self._transaction(lambda db: db.execute("SELECT name, rpm, tpm FROM users ORDER BY name").fetchall())
        return [User(name=name, rpm=rpm, tpm=tpm) for name, rpm, tpm in rows]

    # -- keys --------------------------------------------------------------------------
    async def add_key(self, info: ApiKeyInfo, digest: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (info.user,)).fetchone() is None:
                return False
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?)", (digest, info.id, info.user, info.created))
            return True

        return self._transaction(work)

    async def list_keys(self, user: str) -> list[ApiKeyInfo]:
        rows = self._transaction(
            lambda db: db.execute("SELECT id, created FROM api_keys WHERE user = ? ORDER BY created", (user,)).fetchall()
        )
        return [ApiKeyInfo(id=key_id, user=user, created=created) for key_id, created in rows]

    async def delete_key(self, user: str, key_id: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM api_keys WHERE user = ? AND id = ?", (user, key_id)).rowcount > 0

        return self._transaction(work)

    # -- windows -----------------------------------------------------------------------
    def _trim(self, db: sqlite3.Connection, user: str, since: float) -> tuple[int, int]:
        """Drop what left the window; the window's (requests, tokens) after that."""
        gone_requests = db.execute("DELETE FROM admissions WHERE user = ? AND at <= ?", (user, since)).rowcount
        gone_tokens = db.execute(
            "SELECT COALESCE(SUM(tokens), 0) FROM charges WHERE user = ? AND at <= ?", (user, since)
        ).fetchone()[0]
        db.execute("DELETE FROM charges WHERE user = ? AND at <= ?", (user, since))
        db.execute("INSERT OR IGNORE INTO window_totals (user) VALUES (?)", (user,))
        return db.execute(
            "UPDATE window_totals SET requests = requests - ?, tokens = tokens - ? WHERE user = ? RETURNING requests, tokens",
            (gone_requests, gone_tokens, user),
        ).fetchone()

    def _reset_s(self, db: sqlite3.Connection, table: str, user: str, now: float, fallback: float) -> float:
        oldest = db.execute(f"SELECT MIN(at) FROM {table} WHERE user = ?", (user,)).fetchone()[0]
        return fallback if oldest is None else max(oldest + self.window_s - now, 0.0)

    async def usage(self, name: str) -> WindowUsage | None:
        def work(db: sqlite3.Connection) -> WindowUsage | None:
            row = db.execute("SELECT rpm, tpm FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            requests, tokens = self._trim(db, name, time.time() - self.window_s)
            rpm, tpm = effective_limits(*row)
            return WindowUsage(requests=requests, tokens=tokens, rpm_limit=rpm, tpm_limit=tpm)

        return self._transaction(work)

    async def admit(self, identity: Identity, admission_id: str, token_estimate: int) -> Admission:
        def work(db: sqlite3.Connection) -> Admission:
            name = identity.value
            if identity.kind == "key":
                row = db.execute("SELECT user FROM api_keys WHERE digest = ?", (name,)).fetchone()
                if row is None:
                    return Admission("unknown_key", "")
                name = row[0]
            row = db.execute("SELECT rpm, tpm FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                return Admission("unknown_user", name)
            rpm, tpm = effective_limits(*row)
            now = time.time()
            requests, tokens = self._trim(db, name, now - self.window_s)
            window = self.window_s
            if requests >= rpm:
                return Admission("rpm", name, rpm, requests, self._reset_s(db, "admissions", name, now, window),
                                 tpm, tokens, self._reset_s(db, "charges", name, now, 0.0))  # fmt: skip
            if tokens >= tpm:
                return Admission("tpm", name, rpm, requests, self._reset_s(db, "admissions", name, now, 0.0),
                                 tpm, tokens, self._reset_s(db, "charges", name, now, window))  # fmt: skip
            db.execute("INSERT INTO admissions VALUES (?, ?)", (name, now))
            db.execute("INSERT OR REPLACE INTO charges VALUES (?, ?, ?, ?)", (name, admission_id, now, token_estimate))
            db.execute(
                "UPDATE window_totals SET requests = requests + 1, tokens = tokens + ? WHERE user = ?",
                (token_estimate, name),
            )
            return Admission("admitted", name, rpm, requests + 1, self._reset_s(db, "admissions", name, now, window),
                             tpm, tokens + token_estimate, self._reset_s(db, "charges", name, now, window))  # fmt: skip

        return self._transaction(work)

    async def settle(self, user: str, admission_id: str, tokens: int, reserved: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            # The reservation may have left the window already (a request longer than the window).
            row = db.execute("SELECT tokens FROM charges WHERE user = ? AND id = ?", (user, admission_id)).fetchone()
            still_reserved = 0 if row is None else row[0]
            db.execute("INSERT OR REPLACE INTO charges VALUES (?, ?, ?, ?)", (user, admission_id, time.time(), tokens))
            db.execute("INSERT OR IGNORE INTO window_totals (user) VALUES (?)", (user,))
            db.execute("UPDATE window_totals SET tokens = tokens + ? WHERE user = ?", (tokens - still_reserved, user))

        self._transaction(work)

    async def close(self) -> None:
        self._db.close()
