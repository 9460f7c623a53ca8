"""The index of a cache entry: the union of its shards' records (records.py), loaded by
listing the entry folder, checked, repaired, and kept as a snapshot.

Nothing here rewrites a file per shard. The snapshot (index.npz) is a cache of the union,
rewritten only when the records it lacks reach a quarter of those it holds, so the bytes
it writes over an entry's life stay proportional to the entry. An entry written by
layout 2 (manifest.json) is turned into records on first open.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from tlapp.features import records
from tlapp.features.records import KEY_DTYPE, RecordError, ShardInfo
from tlapp.files import file_sha256

log = logging.getLogger(__name__)

SNAPSHOT = "index.npz"
LAST_USED = "last_used"
MANIFEST = "manifest.json"
LEFTOVER_AGE_S = 3600  # a shard without record, or a temporary file, left by a killed writer
SNAPSHOT_MIN_NEW = 64  # records read one by one before a snapshot is worth writing


@dataclasses.dataclass
class EntryIndex:
    """What an entry holds: its shards, their keys in shard order, and what is wrong."""

    shards: list[ShardInfo]
    keys: np.ndarray
    meta: dict  # key, feature_shape, dtype; empty for an entry without rows
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped_rows: int = 0  # rows of damaged shards removed (repair=True)

    @property
    def rows(self) -> int:
        """Distinct rows: a row two writers both stored counts once."""
        return len(np.unique(self.keys)) if len(self.keys) else 0

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def shard_problem(entry: Path, shard: ShardInfo, full: bool = True) -> str | None:
    """Why a shard cannot be trusted (missing, truncated, checksum), or None.

    full=False checks the checksum only when the file changed since it was written (size
    or mtime), which catches truncation and edits without reading every byte; the loader's
    check for non-finite values catches edits that restored the mtime.
    """
    try:
        stat = (entry / shard.name).stat()
    except FileNotFoundError:
        return "missing"
    if stat.st_size != shard.bytes:
        return f"truncated or extended ({stat.st_size} bytes, expected {shard.bytes})"
    if (full or stat.st_mtime_ns != shard.mtime_ns) and \
            file_sha256(entry / shard.name) != shard.sha256:
        return "checksum mismatch"
    return None


def load_index(entry: Path, repair: bool = False, check: str = "fast") -> EntryIndex:
    """The union of an entry's records, every shard checked by `shard_problem` (check="fast"
    or "full"; "none" skips the shards: listing only).

    With repair=True (a run opening the entry), a layout-2 manifest is turned into
    records, damaged shards and their records are removed (their rows are extracted
    again), leftovers of killed writers are removed, and the snapshot is refreshed when
    stale. Otherwise nothing is written (cache list, cache verify).
    """
    try:
        names = set(os.listdir(entry))
    except (FileNotFoundError, NotADirectoryError):
        return EntryIndex([], np.zeros(0, KEY_DTYPE), {})
    problems: list[tuple[str, str]] = []
    legacy, drop, meta = _read_manifest(entry, names, problems) if MANIFEST in names else (
        {}, set(), {})
    record_names = {n for n in names if n.startswith("shard-") and
                    n.endswith(records.RECORD_SUFFIX)}
    parts: dict[str, tuple[ShardInfo, np.ndarray]] = {}
    covered = _read_snapshot(entry, names, record_names, parts, meta, problems)
    for record in sorted(record_names - covered):
        try:
            shard, keys, record_meta = records.read_record(entry / record)
        except RecordError as e:
            problems.append((record, str(e)))
            drop.add(record[:-len(records.RECORD_SUFFIX)] + ".npy")  # its rows are unknown
            continue
        parts[shard.name] = (shard, keys)
        meta = meta or record_meta
    for name, part in legacy.items():
        parts.setdefault(name, part)
    for name, (shard, _) in parts.items() if check != "none" else ():
        problem = shard_problem(entry, shard, check == "full")
        if problem:
            problems.append((name, problem))
            drop.add(name)
    kept = [parts[name] for name in sorted(parts) if name not in drop]
    index = EntryIndex([shard for shard, _ in kept], np.concatenate([k for _, k in kept])
                       if kept else np.zeros(0, KEY_DTYPE), meta, problems)
    if repair:
        index.dropped_rows = _repair(entry, names, parts, drop, problems, legacy, meta)
        if len(parts) - len(covered) >= max(SNAPSHOT_MIN_NEW, len(covered) // 4):
            _write_snapshot(entry, index)
    return index


def _read_snapshot(entry: Path, names: set[str], record_names: set[str], parts: dict,
                   meta: dict, problems: list) -> set[str]:
    """Adds the snapshot's shards whose record still exists to `parts`; returns the names
    of the records it covered."""
    if SNAPSHOT not in names:
        return set()
    try:
        shards, keys, snapshot_meta = records.read_snapshot(entry / SNAPSHOT)
    except RecordError as e:
        problems.append((SNAPSHOT, f"{e} (rebuilt from the shards' records)"))
        return set()
    meta.update({k: snapshot_meta[k] for k in ("key", "feature_shape", "dtype")
                 if k in snapshot_meta and k not in meta})
    covered, start = set(), 0
    for shard in shards:
        record = records.record_path(entry, shard.name).name
        if record in record_names:
            parts[shard.name] = (shard, keys[start:start + shard.rows])
            covered.add(record)
        start += shard.rows
    return covered


def _write_snapshot(entry: Path, index: EntryIndex) -> None:
    try:
        records.publish(entry / SNAPSHOT, records.save_arrays(
            records.snapshot_arrays(index.shards, index.keys, index.meta)))
    except OSError as e:  # a cache of the records: without it the next open reads them all
        log.debug("cache: could not write %s: %s", entry / SNAPSHOT, e)


def _repair(entry: Path, names: set[str], parts: dict, drop: set[str], problems: list,
            legacy: dict, meta: dict) -> int:
    """Removes damaged shards and leftovers, writes records for migrated shards, retires a
    layout-2 manifest; returns the rows dropped."""
    for name, problem in problems:
        if name in (MANIFEST, SNAPSHOT):
            log.warning("cache: %s of %s is %s", name, entry.name, problem)
    dropped = 0
    for name in sorted(drop):
        rows = parts[name][0].rows if name in parts else 0
        dropped += rows
        reason = next((p for n, p in problems if n in (name, records.record_path(
            entry, name).name)), "damaged")
        log.warning("cache: shard %s of %s is damaged (%s); %s", name, entry.name, reason,
                    f"its {rows} rows will be extracted again" if rows else "removed")
        _remove(entry / name)
        _remove(records.record_path(entry, name))
    for name, (shard, keys) in legacy.items():
        if name not in drop and not records.record_path(entry, name).exists():
            records.write_record(entry, shard, keys, meta)
    if MANIFEST in names:
        try:
            when = float(json.loads((entry / MANIFEST).read_text())["last_used"])
        except (OSError, ValueError, TypeError, KeyError):
            when = None
        touch(entry, when)
        _remove(entry / MANIFEST)
        log.info("cache: %s converted to the record layout (%d shards)", entry.name,
                 len(legacy))
    now = time.time()
    for name in names:
        leftover = (name.startswith("shard-") and name.endswith(".npy") and
                    name not in parts and name not in drop) or records.TEMP_MARK in name
        if leftover and _age_s(entry / name, now) > LEFTOVER_AGE_S:
            log.debug("cache: removing %s, left by an interrupted write", entry / name)
            _remove(entry / name)
    return dropped


def _read_manifest(entry: Path, names: set[str], problems: list
                   ) -> tuple[dict, set[str], dict]:
    """The shards a layout-2 manifest lists, each with its keys; the shards to drop: those
    whose row list does not match their name (the old name rule), or, when the manifest is
    damaged, every shard it may have listed (written before it, without a record); and the
    entry's key, feature shape and dtype."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        listed = {s["file"]: s for s in manifest["shards"]}  # a shard listed twice: once
        written = (entry / MANIFEST).stat().st_mtime_ns
    except FileNotFoundError:  # another process migrated it meanwhile
        return {}, set(), {}
    except (OSError, ValueError, TypeError, KeyError) as e:
        unrecorded = {n for n in names if n.startswith("shard-") and n.endswith(".npy")
                      and records.record_path(entry, n).name not in names
                      and _mtime_ns(entry / n) <= _mtime_ns(entry / MANIFEST)}
        problems.append((MANIFEST, f"damaged ({type(e).__name__}: {e}); the rows of its "
                                   f"{len(unrecorded)} shard(s) cannot be attributed to "
                                   f"images and are extracted again"))
        problems += [(n, "not attributable to images (manifest.json is damaged)")
                     for n in sorted(unrecorded)]
        return {}, unrecorded, {}
    shards, drop = {}, set()
    for name, item in listed.items():
        try:
            rows = list(item["rows"])
            keys = records.keys_of_strings(rows)
            if f"shard-{hashlib.sha256(''.join(rows).encode()).hexdigest()[:16]}.npy" != name:
                raise ValueError("its row list does not match the shard (rows attributed to "
                                 "other images)")
            shards[name] = (ShardInfo(name, len(rows), int(item["bytes"]),
                                      int(item.get("mtime_ns", 0)), str(item["sha256"]),
                                      records.rows_sha256(keys), legacy=True), keys)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            problems.append((name, f"manifest.json: {e}"))
            drop.add(name)
    # Shards the old code wrote but did not list (killed in between) hold unknown rows.
    drop |= {n for n in names if n.startswith("shard-") and n.endswith(".npy")
             and n not in listed and records.record_path(entry, n).name not in names
             and _mtime_ns(entry / n) <= written}
    try:
        meta = {"key": manifest["key"], "feature_shape": list(manifest["feature_shape"]),
                "dtype": manifest["dtype"]}
    except (TypeError, ValueError, KeyError):
        meta = {}
    return shards, drop, meta


def mark_finite(entry: Path, shards: list[ShardInfo], entry_meta: dict) -> list[ShardInfo]:
    """Records that these shards' rows were read and found finite, so that no later run
    reads them for that again: their records are written anew (and the snapshot, if it
    lists them). Returns the shards as now recorded. Best effort: a read-only cache is
    checked again next time."""
    marked = [dataclasses.replace(shard, finite=True) for shard in shards]
    try:
        for shard in marked:
            _, keys, _ = records.read_record(records.record_path(entry, shard.name))
            records.write_record(entry, shard, keys, entry_meta)
        snapshot = entry / SNAPSHOT
        if snapshot.exists():
            listed, keys, meta = records.read_snapshot(snapshot)
            by_name = {shard.name: shard for shard in marked}
            if any(shard.name in by_name for shard in listed):
                listed = [by_name.get(shard.name, shard) for shard in listed]
                records.publish(snapshot, records.save_arrays(
                    records.snapshot_arrays(listed, keys, meta)))
    except (OSError, RecordError) as e:  # removed meanwhile, or read-only: checked again
        log.debug("cache: could not record the finite check in %s: %s", entry, e)
    return marked


def touch(entry: Path, when: float | None = None) -> None:
    """Marks the entry used now (or at `when`): the mtime of an empty file, nothing rewritten."""
    path = entry / LAST_USED
    try:
        path.touch()
        if when is not None:
            os.utime(path, (when, when))
    except OSError as e:  # a read-only cache still serves rows
        log.debug("cache: could not mark %s used: %s", entry, e)


def last_used(entry: Path) -> float:
    """When the entry was last used: `last_used`, else a layout-2 manifest's field, else the
    newest file in it; never fails, so that clearing always works."""
    try:
        return (entry / LAST_USED).stat().st_mtime
    except OSError:
        pass
    try:
        return float(json.loads((entry / MANIFEST).read_text())["last_used"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:
        return max((p.stat().st_mtime for p in entry.iterdir()), default=entry.stat().st_mtime)
    except OSError:
        return 0.0


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
