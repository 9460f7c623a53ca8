"""The scan's memory of checked files: SQLite (WAL) under CACHE/scan/<host>/.

Two tables: `files` (absolute path -> size, mtime, content hash, when hashed) and `results`
(content hash -> the check's verdict). Rows are added in transactions as the scan goes, so
memory stays bounded and an unchanged folder is rescanned without writing anything. Keyed
by DECODER_VERSION: a new decoder checks everything again.

SQLite's locks are only safe among processes of one host, so each host keeps its own store
(the cache folder may be shared over NFS; the feature cache's entries need no lock). A store
that cannot be opened (locked for long, damaged) is set aside with a warning: the scan then
checks every file, it never fails for its store.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from pathlib import Path

from tlapp.data.decoding import DECODER_VERSION
from tlapp.files import disk_full

log = logging.getLogger(__name__)

FLUSH_ROWS = 2000  # rows per transaction
FLUSH_S = 5.0
SAME_TICK_NS = 2_000_000_000  # a file modified this soon after being hashed may have changed
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,
                                  digest BLOB, hashed_ns INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (digest BLOB PRIMARY KEY, reason TEXT, detail TEXT,
                                    height INTEGER, width INTEGER) WITHOUT ROWID;
"""
LOOKUP_MANY = ("SELECT f.path, f.size, f.mtime_ns, f.digest, f.hashed_ns, r.reason, r.detail, "
               "r.height, r.width FROM files f LEFT JOIN results r ON r.digest = f.digest "
               "WHERE f.path IN ({})")
LOOKUP_RANGE = LOOKUP_MANY.replace("IN ({})", "BETWEEN ? AND ? LIMIT ?")
RESULTS_MANY = ("SELECT digest, reason, detail, height, width FROM results "
                "WHERE digest IN ({})")
LOOKUP_BATCH = 500  # paths per query (SQLite's oldest limit on parameters is 999)


def _record(row) -> dict | None:
    """A verdict from (reason, detail, height, width); None for no row (a stored verdict
    always has a detail, "" when the file is fine)."""
    if row is None or row[1] is None:
        return None
    reason, detail, height, width = row
    return {"reason": reason, "detail": detail or "", "height": height or 0,
            "width": width or 0}


def unchanged(row, stat: os.stat_result) -> tuple[str, dict | None] | None:
    """(content hash, stored verdict or None) from a file's stored row (`rows_of`) if the
    file is unchanged since it was hashed (size and mtime, and modified clearly before the
    hash was taken), else None."""
    if row is None or row[0] != stat.st_size or row[1] != stat.st_mtime_ns or \
            stat.st_mtime_ns >= row[3] - SAME_TICK_NS:
        return None
    return row[2].hex(), _record(row[4:])


class CheckStore:
    """Check results of one host's scans. Use `open_store`, which never raises."""

    def __init__(self, cache_dir: str | os.PathLike):
        host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
        self.folder = Path(cache_dir).expanduser() / "scan" / (host or "host")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"checks-{DECODER_VERSION}.sqlite"
        self.db = self._connect()
        self._files: list[tuple] = []
        self._results: dict[bytes, dict] = {}
        self._flushed = time.monotonic()
        self._import_json(Path(cache_dir).expanduser() / "scan"
                          / f"validation-{DECODER_VERSION}.json")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            db.execute("SELECT count(*) FROM results WHERE digest = x''").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def rows_of(self, paths: list[str]) -> dict[str, tuple]:
        """The stored rows of these absolute paths (those it has, and maybe others), for
        `unchanged`: one range query for a window of neighbouring paths (a scan's windows
        are runs of one folder: a sequential read of the table), else one query per
        LOOKUP_BATCH paths."""
        if not paths:
            return {}
        limit = 2 * len(paths) + 64  # more in the range: other files between, look up each
        found = self.db.execute(LOOKUP_RANGE, (min(paths), max(paths), limit)).fetchall()
        if len(found) < limit:
            return {row[0]: row[1:] for row in found}
        rows = {}
        for start in range(0, len(paths), LOOKUP_BATCH):
            chunk = paths[start:start + LOOKUP_BATCH]
            for row in self.db.execute(LOOKUP_MANY.format(",".join("?" * len(chunk))), chunk):
                rows[row[0]] = row[1:]
        return rows

    def results_of(self, digests: list[str]) -> dict[str, dict]:
        """The stored verdicts of these content hashes (those it has), pending ones
        included: one query per LOOKUP_BATCH hashes."""
        found, asked = {}, []
        for digest in dict.fromkeys(digests):
            key = bytes.fromhex(digest)
            if key in self._results:
                found[digest] = self._results[key]
            else:
                asked.append(key)
        for start in range(0, len(asked), LOOKUP_BATCH):
            chunk = asked[start:start + LOOKUP_BATCH]
            for key, *row in self.db.execute(RESULTS_MANY.format(",".join("?" * len(chunk))),
                                             chunk):
                found[key.hex()] = _record(row)
        return found

    def add_file(self, path: str, stat: os.stat_result, digest: str, hashed_ns: int) -> None:
        self._files.append((path, stat.st_size, stat.st_mtime_ns, bytes.fromhex(digest),
                            hashed_ns))
        self._maybe_flush()

    def add_result(self, digest: str, record: dict) -> None:
        self._results[bytes.fromhex(digest)] = record
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._files) + len(self._results) >= FLUSH_ROWS or \
                time.monotonic() - self._flushed > FLUSH_S:
            self.flush()

    def flush(self, files_left: int = 0) -> None:
        """Writes what was added in one transaction (all of it, or nothing)."""
        self._flushed = time.monotonic()
        if not self._files and not self._results:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                                self._files)
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", [
                (key, r["reason"], r["detail"], r["height"], r["width"])
                for key, r in self._results.items()])
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if "full" in str(e):  # SQLITE_FULL: nothing of this transaction was stored
                raise disk_full(self.folder, "the scan's check results", (
                    f"About {(files_left + len(self._files)) * 300 / 2**20:,.0f} MiB more "
                    f"are needed to remember the checks of the files left. Free some space "
                    f"or pass --cache-dir on another disk.")) from None
            raise
        self._files.clear()
        self._results.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()

    def _import_json(self, path: Path) -> None:
        """Takes over the results of the JSON store of earlier versions (once)."""
        if not path.is_file():
            return
        try:
            stored = json.loads(path.read_text())
            for name, (size, mtime, digest, started) in stored["files"].items():
                self._files.append((name, size, mtime, bytes.fromhex(digest), started))
            for digest, record in stored["results"].items():
                self._results[bytes.fromhex(digest)] = record
            self.flush()
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.debug("scan: the old check results %s were not usable: %s", path, e)
        path.unlink(missing_ok=True)


def open_store(cache_dir: str | os.PathLike | None) -> CheckStore | None:
    """The store under `cache_dir` (None without one). A damaged store is moved aside and
    a new one started; one that cannot be used at all is skipped, with a warning."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir).expanduser() / "scan"
    try:
        return CheckStore(cache_dir)
    except sqlite3.DatabaseError as e:
        if "locked" not in str(e):  # "file is not a database", "malformed": start anew
            for old in folder.glob(f"*/checks-{DECODER_VERSION}.sqlite*"):
                old.replace(old.with_name(old.name + ".damaged"))
            log.warning("scan: the store of earlier check results under %s was damaged (%s); "
                        "it was set aside and every file is checked again", folder, e)
            try:
                return CheckStore(cache_dir)
            except (sqlite3.DatabaseError, OSError) as again:
                e = again
        log.warning("scan: cannot use the store of earlier check results under %s (%s); "
                    "every file is checked", folder, e)
    except OSError as e:
        log.warning("scan: cannot use the store of earlier check results under %s (%s); "
                    "every file is checked", folder, e)
    return None
