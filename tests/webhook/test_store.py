"""The delivery store on its own: durability settings, what a record holds, bounds, disk errors and
files of other versions."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deployments.webhook import store as store_module
from deployments.webhook.core import DeployRequest
from deployments.webhook.store import SCHEMA_VERSION, DeliveryStore, StoreError, StoreFull
from tests.webhook.helpers import SECRET

SHA = "9f3b5c2d1e0a4b8c7d6e5f4a3b2c1d0e9f8a7b6c"


def request(delivery: str, env: str = "staging") -> DeployRequest:
    return DeployRequest("workout-api", env, "refs/heads/main", SHA, f"{delivery}:workout-api:{env}")


def add(store: DeliveryStore, delivery: str, *envs: str) -> None:
    store.add(delivery, "push", [request(delivery, e) for e in envs or ("staging",)], datetime.now(UTC))


def test_store_is_wal_with_full_sync_and_versioned(tmp_path: Path) -> None:
    """A new store file is in WAL mode, fsyncs every commit (synchronous=FULL) and records its schema version."""
    store = DeliveryStore(tmp_path / "d.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.schema_version() == SCHEMA_VERSION
    store.close()


def test_record_round_trip_survives_reopen_and_holds_nothing_secret(tmp_path: Path) -> None:
    """A stored delivery reopens with its requests, status, attempts and run ids; the file holds no
    secret and no body."""
    path = tmp_path / "d.sqlite3"
    store = DeliveryStore(path)
    add(store, "d-1", "staging", "dev")
    store.record_attempt("d-1", 0, "created run r-1", run_id="r-1")
    store.close()

    store = DeliveryStore(path)
    record = store.get("d-1")
    assert record is not None and record.status == "pending" and record.run_ids == ["r-1"]
    assert [(r.app, r.environment, r.ref, r.sha) for r in record.requests] == [
        ("workout-api", "staging", "refs/heads/main", SHA), ("workout-api", "dev", "refs/heads/main", SHA)]
    record = store.record_attempt("d-1", 1, "created run r-2", run_id="r-2")
    assert record.status == "dispatched" and record.run_ids == ["r-1", "r-2"] and record.attempt_count == 2
    assert [a["outcome"] for a in record.attempts] == ["created run r-1", "created run r-2"]
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert SECRET.encode() not in raw and b"Codertocat" not in raw and b"sha256=" not in raw


def test_known_delivery_id_is_not_stored_twice(tmp_path: Path) -> None:
    """Adding a known delivery id returns the existing record and creates none."""
    store = DeliveryStore(tmp_path / "d.sqlite3")
    add(store, "d-1")
    record, created = store.add("d-1", "push", [request("d-1", "prod")], datetime.now(UTC))
    assert not created and record.requests[0].environment == "staging"
    assert store.counts() == {"pending": 1, "dispatched": 0, "failed": 0}


def test_bounded_pending_and_total(tmp_path: Path) -> None:
    """At max_pending pending deliveries a new one is refused with StoreFull; past max_records the
    oldest finished deliveries are dropped, never a pending one."""
    store = DeliveryStore(tmp_path / "d.sqlite3", max_pending=2, max_records=3)
    add(store, "a")
    add(store, "b")
    with pytest.raises(StoreFull, match="max_pending 2"):
        add(store, "c")
    store.record_attempt("a", 0, "created", run_id="r-a")
    store.record_attempt("b", 0, "created", run_id="r-b")
    add(store, "c")
    add(store, "d")
    assert store.get("a") is None and store.get("b") is not None
    assert [r.delivery_id for r in store.recent()] == ["d", "c", "b"]
    assert [r.delivery_id for r in store.recent(pending_only=True)] == ["d", "c"]


def test_disk_full_is_a_store_error_and_stores_nothing(tmp_path: Path) -> None:
    """SQLite's own 'database or disk is full' (a page cap) surfaces as StoreError; nothing half-written."""
    store = DeliveryStore(tmp_path / "d.sqlite3")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="full"):
        for i in range(10_000):
            add(store, f"fill-{i}")
    stored = {r.delivery_id for r in store.recent(limit=100_000)}
    assert all(store.get(d) is not None for d in stored)
    assert len(stored) < 10_000


def test_file_from_before_versioning_is_refused_untouched(tmp_path: Path) -> None:
    """A store file from before schema versioning (a deliveries table, no schema_version) is refused
    with an error naming the file, and its bytes are left as they were."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE deliveries (delivery_id TEXT PRIMARY KEY, body BLOB)")
    db.execute("INSERT INTO deliveries VALUES ('d-1', x'00')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as exc:
        DeliveryStore(path)
    assert str(path) in str(exc.value) and "no schema_version" in str(exc.value)
    assert path.read_bytes() == before


def test_file_of_an_unmigratable_or_newer_version_is_refused(tmp_path: Path) -> None:
    """Version 0 (no known migration) and a version newer than ours are refused, each saying why."""
    for version, words in ((0, "cannot be migrated"), (SCHEMA_VERSION + 1, "newer receiver")):
        path = tmp_path / f"v{version}.sqlite3"
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        db.commit()
        db.close()
        before = path.read_bytes()
        with pytest.raises(StoreError, match=words):
            DeliveryStore(path)
        assert path.read_bytes() == before


def test_older_version_is_migrated_keeping_its_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of the previous schema version is migrated in place when a migration is known: records
    kept, version bumped."""
    path = tmp_path / "d.sqlite3"
    store = DeliveryStore(path)
    add(store, "d-1")
    store.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(store_module, "_MIGRATIONS",
                        {SCHEMA_VERSION: ["ALTER TABLE deliveries ADD COLUMN note TEXT NOT NULL DEFAULT ''"]})
    store = DeliveryStore(path)
    assert store.schema_version() == SCHEMA_VERSION + 1
    record = store.get("d-1")
    assert record is not None and record.status == "pending"


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not SQLite at all is a StoreError naming it, not a crash."""
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="junk.sqlite3"):
        DeliveryStore(path)
