"""Durable state: SQLite (WAL) for models, versions, scans and events; blobs on disk by sha256.

Every state change is one transaction, so a crash leaves either the old or the new state. A version is
served only if its row says ADMITTED (``Store.admitted``), which is written in the same transaction as the
verdict that justifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Admission states (mirrors drmguard.v1.State without importing the generated code here).
RECEIVED, QUEUED, SCANNING, MITIGATING, ADMITTED, REJECTED, FAILED = (
    "RECEIVED", "QUEUED", "SCANNING", "MITIGATING", "ADMITTED", "REJECTED", "FAILED")
ACTIVE_STATES = (RECEIVED, QUEUED, SCANNING, MITIGATING)
FINAL_STATES = (ADMITTED, REJECTED, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, task TEXT NOT NULL, served_version TEXT NOT NULL DEFAULT '',
    pinned INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, state TEXT NOT NULL,
    verdict TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', mitigated INTEGER NOT NULL DEFAULT 0,
    parent_version TEXT NOT NULL DEFAULT '', scan_id TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
    admitted_at REAL, meta TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS scans (
    scan_id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, task TEXT NOT NULL,
    sha256 TEXT NOT NULL, profile TEXT NOT NULL, benign_id TEXT NOT NULL, refs TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL, verdict TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
    perturbation_ratio REAL, mitigated INTEGER NOT NULL DEFAULT 0, admitted_version TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '', mitigation_report TEXT NOT NULL DEFAULT '', rescan_report TEXT NOT NULL DEFAULT '',
    clean_error_before REAL, clean_error_after REAL, reused_from TEXT NOT NULL DEFAULT '',
    seq INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scan_id TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS benign_sets (
    id TEXT PRIMARY KEY, num_images INTEGER NOT NULL, shape TEXT NOT NULL, has_labels INTEGER NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS served_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS scans_by_sha ON scans(sha256);
CREATE INDEX IF NOT EXISTS scans_by_state ON scans(state);
"""


class BlobStore:
    """Content-addressed files ``<root>/<sha[:2]>/<sha>``, written to a temp file then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dst = self.path(sha)
        if dst.is_file():
            return sha
        dst.parent.mkdir(exist_ok=True)
        tmp = self.root / "tmp" / f"{sha}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)  # atomic: readers see the whole file or none
        return sha

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


@dataclass
class Row:
    """A dict-like row (sqlite3.Row is not picklable or mutable; we need neither, but want attributes)."""

    data: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


class Store:
    """Thread-safe SQLite store (one connection guarded by a lock; WAL so readers never block a writer)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        # absolute: the scan worker runs in its job folder and reads every path the job file gives it from there,
        # so a relative --data-dir (the default, ./guard-data) failed every scan before this
        self.dir = Path(data_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.dir / "blobs")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "guard.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Row | None:
        with self._lock:
            r = self._db.execute(sql, args).fetchone()
        return None if r is None else Row(dict(r))

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Row]:
        with self._lock:
            return [Row(dict(r)) for r in self._db.execute(sql, args).fetchall()]

    # --- benign sets -------------------------------------------------------------------------------
    def add_benign(self, sha: str, num_images: int, shape: tuple[int, ...], has_labels: bool) -> None:
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO benign_sets VALUES (?,?,?,?,?)",
                       (sha, num_images, json.dumps(list(shape)), int(has_labels), time.time()))

    def benign(self, sha: str) -> Row | None:
        return self._one("SELECT * FROM benign_sets WHERE id=?", (sha,))

    # --- models and versions -----------------------------------------------------------------------
    def model(self, name: str) -> Row | None:
        return self._one("SELECT * FROM models WHERE name=?", (name,))

    def models(self, name: str = "") -> list[Row]:
        if name:
            return self._all("SELECT * FROM models WHERE name=?", (name,))
        return self._all("SELECT * FROM models ORDER BY name")

    def version(self, name: str, version: str) -> Row | None:
        return self._one("SELECT * FROM versions WHERE name=? AND version=?", (name, version))

    def versions(self, name: str) -> list[Row]:
        return self._all("SELECT * FROM versions WHERE name=? ORDER BY created_at, rowid", (name,))

    def admitted(self, name: str, version: str) -> Row | None:
        """The version row only if it is ADMITTED: the one gate before anything is served."""
        return self._one("SELECT * FROM versions WHERE name=? AND version=? AND state=?", (name, version, ADMITTED))

    def admitted_versions(self, name: str) -> list[Row]:
        return self._all("SELECT * FROM versions WHERE name=? AND state=? ORDER BY admitted_at, rowid",
                         (name, ADMITTED))

    def served(self) -> list[tuple[str, str]]:
        """(name, version) of every served version whose row is ADMITTED."""
        rows = self._all("SELECT m.name, m.served_version FROM models m JOIN versions v ON v.name=m.name "
                         "AND v.version=m.served_version WHERE v.state=?", (ADMITTED,))
        return [(r.name, r.served_version) for r in rows]

    def set_served(self, name: str, version: str, *, pinned: bool | None = None) -> str:
        """Points `name` at `version` (must be ADMITTED); returns the previous served version."""
        with self.tx() as db:
            m = db.execute("SELECT served_version FROM models WHERE name=?", (name,)).fetchone()
            prev = m["served_version"] if m else ""
            if version:
                ok = db.execute("SELECT 1 FROM versions WHERE name=? AND version=? AND state=?",
                                (name, version, ADMITTED)).fetchone()
                if not ok:
                    raise LookupError(f"{name}:{version} is not an admitted version")
            db.execute("UPDATE models SET served_version=? WHERE name=?", (version, name))
            if pinned is not None:
                db.execute("UPDATE models SET pinned=? WHERE name=?", (int(pinned), name))
            if version and version != prev:
                db.execute("INSERT INTO served_history (name, version, ts) VALUES (?,?,?)", (name, version, time.time()))
        return prev

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self.tx() as db:
            db.execute("UPDATE models SET pinned=? WHERE name=?", (int(pinned), name))

    def served_history(self, name: str) -> list[str]:
        return [r.version for r in self._all("SELECT version FROM served_history WHERE name=? ORDER BY id", (name,))]

    # --- scans -------------------------------------------------------------------------------------
    def create_scan(self, *, name: str, version: str, task: str, sha256: str, profile: str, benign_id: str,
                    refs: list[tuple[str, str]], meta: dict[str, Any], state: str = RECEIVED,
                    reused_from: Row | None = None) -> str:
        """Creates the model (if new), the version and its scan in one transaction; returns the scan id."""
        scan_id = uuid.uuid4().hex
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO models (name, task, created_at) VALUES (?,?,?)", (name, task, now))
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM scans").fetchone()[0]
            db.execute("INSERT INTO versions (name, version, sha256, state, scan_id, created_at, meta) "
                       "VALUES (?,?,?,?,?,?,?)", (name, version, sha256, state, scan_id, now, json.dumps(meta)))
            db.execute("INSERT INTO scans (scan_id, name, version, task, sha256, profile, benign_id, refs, state, "
                       "seq, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (scan_id, name, version, task, sha256, profile, benign_id, json.dumps(refs), state, seq,
                        now, now))
            db.execute("INSERT INTO events (scan_id, ts, state, message) VALUES (?,?,?,?)",
                       (scan_id, now, state, "received"))
        return scan_id

    def scan(self, scan_id: str) -> Row | None:
        return self._one("SELECT * FROM scans WHERE scan_id=?", (scan_id,))

    def scans_in(self, states: tuple[str, ...]) -> list[Row]:
        q = ",".join("?" * len(states))
        return self._all(f"SELECT * FROM scans WHERE state IN ({q}) ORDER BY seq", states)

    def finished_scan_for_sha(self, sha256: str) -> Row | None:
        """The earliest scan of these bytes with a verdict (ADMITTED or REJECTED), if any."""
        return self._one("SELECT * FROM scans WHERE sha256=? AND state IN (?,?) AND reused_from='' ORDER BY seq "
                         "LIMIT 1", (sha256, ADMITTED, REJECTED))

    def set_state(self, scan_id: str, state: str, message: str = "", **fields_: Any) -> None:
        """Moves a scan (and its submitted version) to a non-admitting state; records an event."""
        assert state != ADMITTED, "use admit() to admit"
        now = time.time()
        with self.tx() as db:
            sets = ", ".join(f"{k}=?" for k in fields_)
            db.execute(f"UPDATE scans SET state=?, updated_at=?{', ' + sets if sets else ''} WHERE scan_id=?",
                       (state, now, *fields_.values(), scan_id))
            s = db.execute("SELECT name, version, verdict, reason FROM scans WHERE scan_id=?", (scan_id,)).fetchone()
            db.execute("UPDATE versions SET state=?, verdict=?, reason=? WHERE name=? AND version=? AND scan_id=?",
                       (state, s["verdict"], s["reason"], s["name"], s["version"], scan_id))
            db.execute("INSERT INTO events (scan_id, ts, state, message) VALUES (?,?,?,?)",
                       (scan_id, now, state, message))

    def admit(self, scan_id: str, *, verdict: str, reason: str, mitigated_version: str = "",
              mitigated_sha: str = "", mitigated_meta: dict[str, Any] | None = None, **fields_: Any) -> str:
        """Writes the verdict and admits one version in one transaction; returns the admitted version.

        Benign: the submitted version is ADMITTED. Mitigated: the submitted version is REJECTED (backdoored)
        and a new version `mitigated_version` (parent = the submitted one) is inserted ADMITTED.
        """
        now = time.time()
        with self.tx() as db:
            s = db.execute("SELECT * FROM scans WHERE scan_id=?", (scan_id,)).fetchone()
            if mitigated_version:
                db.execute("UPDATE versions SET state=?, verdict=?, reason=? WHERE name=? AND version=?",
                           (REJECTED, verdict, f"backdoored; mitigated as {mitigated_version}", s["name"],
                            s["version"]))
                db.execute("INSERT INTO versions (name, version, sha256, state, verdict, reason, mitigated, "
                           "parent_version, scan_id, created_at, admitted_at, meta) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                           (s["name"], mitigated_version, mitigated_sha, ADMITTED, "benign", reason, 1,
                            s["version"], scan_id, now, now, json.dumps(mitigated_meta or {})))
                admitted = mitigated_version
            else:
                db.execute("UPDATE versions SET state=?, verdict=?, reason=?, admitted_at=? WHERE name=? AND version=?",
                           (ADMITTED, verdict, reason, now, s["name"], s["version"]))
                admitted = s["version"]
            sets = "".join(f", {k}=?" for k in fields_)
            db.execute(f"UPDATE scans SET state=?, verdict=?, reason=?, admitted_version=?, mitigated=?, "
                       f"updated_at=?{sets} WHERE scan_id=?",
                       (ADMITTED, verdict, reason, admitted, int(bool(mitigated_version)), now, *fields_.values(),
                        scan_id))
            db.execute("INSERT INTO events (scan_id, ts, state, message) VALUES (?,?,?,?)",
                       (scan_id, now, ADMITTED, f"admitted {s['name']}:{admitted}"))
        return admitted

    def events(self, scan_id: str) -> list[Row]:
        return self._all("SELECT * FROM events WHERE scan_id=? ORDER BY id", (scan_id,))

    def count_in(self, states: tuple[str, ...]) -> int:
        q = ",".join("?" * len(states))
        row = self._one(f"SELECT COUNT(*) AS n FROM scans WHERE state IN ({q})", states)
        return int(row.n) if row else 0
