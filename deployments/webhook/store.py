"""The receiver's durable intake: every delivery that asks for deploys is written here before GitHub
gets its 202, and the dispatcher creates the runs from here.

SQLite in WAL mode with `synchronous=FULL`: once `add` returns, the record survives a SIGKILL of the
receiver and a power cut (the WAL is fsynced at each commit). A record holds the delivery id, the
event name, the decided requests (app, environment, ref, sha), the received time, the status
(`pending`, `dispatched`, `failed`), the failure reason, the attempts (time, outcome) and the created
run ids. Never the raw body, a signature or the secret.

The store is bounded: at `max_pending` pending deliveries `add` raises `StoreFull` (the receiver
answers 503 with Retry-After); past `max_records` the oldest finished deliveries are dropped.
Any SQLite error (disk full, a read-only file, I/O) surfaces as `StoreError`, so that a delivery that
was not stored is never acknowledged.

The file carries its schema version (`schema_version`). A file written by another version is
migrated step by step in one transaction when we know how (`_MIGRATIONS`), and refused with an error
naming the file otherwise: never written over, never silently reinterpreted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from delivery.errors import DeliveryError
from deployments.webhook.core import DeployRequest

SCHEMA_VERSION = 1
# Kept per delivery: the first attempt and the latest ones, so a delivery retried for days while
# Prefect is down does not grow without bound. `attempt_count` still counts every one.
MAX_ATTEMPTS_KEPT = 20

PENDING, DISPATCHED, FAILED = "pending", "dispatched", "failed"

_SCHEMA_V1 = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery_id TEXT NOT NULL UNIQUE,
        event TEXT NOT NULL,
        received_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'dispatched', 'failed')),
        reason TEXT NOT NULL DEFAULT '',
        requests TEXT NOT NULL,
        attempts TEXT NOT NULL DEFAULT '[]',
        attempt_count INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX deliveries_status_seq ON deliveries (status, seq)",
)

# version n -> statements that turn a version-n file into version n+1. Empty while 1 is the only
# version that ever shipped; anything older (no `schema_version` table) is refused.
_MIGRATIONS: dict[int, Sequence[str]] = {}


class StoreError(DeliveryError):
    """The delivery store could not be opened, read or written (disk full, read-only, wrong version)."""


class StoreFull(StoreError):
    """The store holds `max_pending` deliveries not yet dispatched; the receiver answers 503."""


@dataclass
class RequestRecord:
    app: str
    environment: str
    ref: str
    sha: str
    idempotency_key: str
    run_id: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.run_id is not None or self.error is not None


@dataclass
class DeliveryRecord:
    seq: int
    delivery_id: str
    event: str
    received_at: datetime
    status: str
    reason: str
    requests: list[RequestRecord]
    attempts: list[dict[str, Any]] = field(default_factory=list)
    attempt_count: int = 0
    updated_at: datetime | None = None

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.requests if r.run_id]


def _now() -> datetime:
    return datetime.now(UTC)


def _row_to_record(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        seq=row["seq"],
        delivery_id=row["delivery_id"],
        event=row["event"],
        received_at=datetime.fromisoformat(row["received_at"]),
        status=row["status"],
        reason=row["reason"],
        requests=[RequestRecord(**r) for r in json.loads(row["requests"])],
        attempts=json.loads(row["attempts"]),
        attempt_count=row["attempt_count"],
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


class DeliveryStore:
    """Thread-safe: one connection behind a lock (the handler and the dispatcher call it from worker
    threads so that an fsync never stalls the event loop)."""

    def __init__(self, path: Path | str, *, max_pending: int = 10_000, max_records: int = 100_000,
                 create: bool = True) -> None:
        if max_pending < 1 or max_records < max_pending:
            raise StoreError(f"delivery store bounds: need 1 <= max_pending ({max_pending}) <= "
                             f"max_records ({max_records})")
        self.path = Path(path)
        self.max_pending = max_pending
        self.max_records = max_records
        self._lock = threading.Lock()
        if not create and not self.path.exists():
            raise StoreError(f"no delivery store at {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the delivery store {self.path}: {e}") from e
        self._db.row_factory = sqlite3.Row
        try:
            self._prepare()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(f"cannot open the delivery store {self.path}: {e}") from e
        except StoreError:
            self._db.close()
            raise

    # ------------------------------------------------------------------ schema

    def _prepare(self) -> None:
        db = self._db
        # Read the version before anything writes: a foreign file must be left exactly as it was.
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            self._set_pragmas()
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA_V1:
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (1,))
                self._migrate_from(1)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return
        if "schema_version" not in tables:
            raise StoreError(
                f"{self.path} is not a delivery store of a known version (no schema_version table; tables: "
                f"{', '.join(sorted(tables))}); move it away to start a new store")
        rows = db.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int):
            raise StoreError(f"{self.path}: schema_version must hold exactly one integer row")
        version = rows[0][0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer receiver (schema version {version}, this one "
                             f"knows up to {SCHEMA_VERSION}); run that version or move the file away")
        if version < SCHEMA_VERSION and any(v not in _MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise StoreError(f"{self.path} has schema version {version}, which cannot be migrated to "
                             f"{SCHEMA_VERSION}; move it away to start a new store")
        self._set_pragmas()
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._migrate_from(version)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _migrate_from(self, version: int) -> None:
        for v in range(version, SCHEMA_VERSION):
            for stmt in _MIGRATIONS[v]:
                self._db.execute(stmt)
        self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def _set_pragmas(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        # FULL: the WAL is fsynced at every commit, so an acknowledged delivery survives a power cut.
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA busy_timeout = 10000")

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes

    def _write(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(*args)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except StoreError:
                raise
            except sqlite3.Error as e:
                raise StoreError(f"delivery store {self.path}: {type(e).__name__}: {e}") from e
            return result

    def add(self, delivery_id: str, event: str, requests: Sequence[DeployRequest],
            received_at: datetime) -> tuple[DeliveryRecord, bool]:
        """Store a new pending delivery; a known id returns its record unchanged. (record, created)."""
        return self._write(self._add, delivery_id, event, requests, received_at)

    def _add(self, delivery_id: str, event: str, requests: Sequence[DeployRequest],
             received_at: datetime) -> tuple[DeliveryRecord, bool]:
        existing = self._get(delivery_id)
        if existing is not None:
            return existing, False
        pending = self._db.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
        if pending >= self.max_pending:
            raise StoreFull(f"delivery store {self.path} holds {pending} pending deliveries (max_pending "
                            f"{self.max_pending})")
        reqs = [RequestRecord(r.app, r.environment, r.source_ref, r.source_sha, r.idempotency_key).__dict__
                for r in requests]
        now = _now().isoformat()
        self._db.execute(
            "INSERT INTO deliveries (delivery_id, event, received_at, status, requests, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?)",
            (delivery_id, event, received_at.isoformat(), json.dumps(reqs), now),
        )
        total = self._db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
        if total > self.max_records:
            # Pending ones are never dropped: max_pending <= max_records leaves room for them.
            self._db.execute(
                "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries WHERE status != 'pending' "
                "ORDER BY seq LIMIT ?)", (total - self.max_records,))
        record = self._get(delivery_id)
        assert record is not None
        return record, True

    def requeue(self, delivery_id: str) -> DeliveryRecord | None:
        """A failed delivery back to pending (GitHub's Redeliver after the cause was fixed); the
        requests refused before are tried again, those with a run keep it."""
        return self._write(self._requeue, delivery_id)

    def _requeue(self, delivery_id: str) -> DeliveryRecord | None:
        record = self._get(delivery_id)
        if record is None or record.status != FAILED:
            return record
        for r in record.requests:
            r.error = None
        self._db.execute(
            "UPDATE deliveries SET status = 'pending', reason = '', requests = ?, updated_at = ? WHERE delivery_id = ?",
            (json.dumps([r.__dict__ for r in record.requests]), _now().isoformat(), delivery_id))
        return self._get(delivery_id)

    def record_attempt(self, delivery_id: str, index: int, outcome: str, *, run_id: str | None = None,
                       error: str | None = None) -> DeliveryRecord:
        """One attempt at request `index`: its outcome, and its run id (created) or error (refused for
        good). The delivery becomes `dispatched` when every request has a run, `failed` when every
        request is done and one was refused."""
        return self._write(self._record_attempt, delivery_id, index, outcome, run_id, error)

    def _record_attempt(self, delivery_id: str, index: int, outcome: str, run_id: str | None,
                        error: str | None) -> DeliveryRecord:
        record = self._get(delivery_id)
        if record is None:
            raise StoreError(f"delivery {delivery_id} is not in the store")
        req = record.requests[index]
        if run_id is not None:
            req.run_id = run_id
        if error is not None:
            req.error = error
        now = _now()
        attempt = {"at": now.isoformat(), "request": f"{req.app}/{req.environment}", "outcome": outcome}
        attempts = record.attempts + [attempt]
        if len(attempts) > MAX_ATTEMPTS_KEPT:
            attempts = attempts[:1] + attempts[-(MAX_ATTEMPTS_KEPT - 1):]
        status, reason = record.status, record.reason
        if all(r.done for r in record.requests):
            refused = [r for r in record.requests if r.error]
            status = FAILED if refused else DISPATCHED
            reason = "; ".join(f"{r.app}/{r.environment}: {r.error}" for r in refused)
        self._db.execute(
            "UPDATE deliveries SET status = ?, reason = ?, requests = ?, attempts = ?, attempt_count = "
            "attempt_count + 1, updated_at = ? WHERE delivery_id = ?",
            (status, reason, json.dumps([r.__dict__ for r in record.requests]), json.dumps(attempts),
             now.isoformat(), delivery_id))
        updated = self._get(delivery_id)
        assert updated is not None
        return updated

    # ------------------------------------------------------------------ reads

    def _get(self, delivery_id: str) -> DeliveryRecord | None:
        row = self._db.execute("SELECT * FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return _row_to_record(row) if row is not None else None

    def _read(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            try:
                return fn(*args)
            except sqlite3.Error as e:
                raise StoreError(f"delivery store {self.path}: {type(e).__name__}: {e}") from e

    def get(self, delivery_id: str) -> DeliveryRecord | None:
        return self._read(self._get, delivery_id)

    def next_pending(self) -> DeliveryRecord | None:
        """The oldest pending delivery: the dispatcher works in arrival order."""
        def q() -> DeliveryRecord | None:
            row = self._db.execute(
                "SELECT * FROM deliveries WHERE status = 'pending' ORDER BY seq LIMIT 1").fetchone()
            return _row_to_record(row) if row is not None else None
        return self._read(q)

    def recent(self, *, limit: int = 20, pending_only: bool = False) -> list[DeliveryRecord]:
        """The newest deliveries first."""
        where = "WHERE status = 'pending' " if pending_only else ""
        def q() -> list[DeliveryRecord]:
            rows = self._db.execute(f"SELECT * FROM deliveries {where}ORDER BY seq DESC LIMIT ?",  # noqa: S608
                                    (limit,)).fetchall()
            return [_row_to_record(r) for r in rows]
        return self._read(q)

    def counts(self) -> dict[str, int]:
        def q() -> dict[str, int]:
            rows = self._db.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
            return {PENDING: 0, DISPATCHED: 0, FAILED: 0, **{r[0]: r[1] for r in rows}}
        return self._read(q)
