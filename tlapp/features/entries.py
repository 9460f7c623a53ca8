"""Looking after the cache folder: listing, verifying and clearing entries (`tlapp cache`).

None of these ever fails on a damaged entry: it is listed with its problems, verified as
damaged, and cleared like any other (clearing reads nothing but file times).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from tlapp.features import index as index_lib, records


def is_entry(folder: Path) -> bool:
    """A folder that holds a cache entry (of either layout), damaged or not."""
    try:
        return folder.is_dir() and any(
            n in (index_lib.MANIFEST, index_lib.SNAPSHOT, index_lib.LAST_USED)
            or (n.startswith("shard-") and n.endswith((".npy", records.RECORD_SUFFIX)))
            for n in os.listdir(folder))
    except OSError:
        return False


def entry_folders(cache_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(cache_dir).iterdir() if is_entry(p))
    except (FileNotFoundError, NotADirectoryError):
        return []


def list_entries(cache_dir: Path) -> list[dict]:
    """One dict per entry: name, key fields, distinct rows, bytes, last used, and the
    problems seen without reading shards (a damaged entry is listed, never fatal)."""
    entries = []
    for entry in entry_folders(cache_dir):
        try:
            loaded = index_lib.load_index(entry, check="none")
            info = {"key": loaded.meta.get("key", {}), "rows": loaded.rows,
                    "bytes": loaded.bytes, "problems": loaded.problems}
        except Exception as e:  # whatever is wrong, the entry is listed (and can be cleared)
            info = {"key": {}, "rows": 0, "bytes": 0,
                    "problems": [("(entry)", f"unreadable ({type(e).__name__}: {e})")]}
        entries.append({"entry": entry.name, **info, "last_used": index_lib.last_used(entry)})
    return entries


def read_manifest(entry: Path) -> dict | None:
    """The entry as a layout-2 manifest would describe it (one string per row: for tools
    and tests on small entries), or None if it holds nothing."""
    loaded = index_lib.load_index(entry, check="none")
    if not loaded.shards:
        return None
    starts = np.cumsum([0] + [s.rows for s in loaded.shards])
    return {**loaded.meta, "shards": [
        {"file": s.name, "sha256": s.sha256, "bytes": s.bytes, "mtime_ns": s.mtime_ns,
         "rows": records.key_strings(loaded.keys[a:b])}
        for s, a, b in zip(loaded.shards, starts, starts[1:])]}


def verify_entry(entry: Path) -> list[tuple[str, str]]:
    """(file, problem) for everything damaged in an entry (full checksums)."""
    try:
        return index_lib.load_index(entry, check="full").problems
    except Exception as e:
        return [("(entry)", f"unreadable ({type(e).__name__}: {e})")]


def clear_entries(cache_dir: Path, names: list[str] | None = None,
                  older_than_days: float | None = None) -> list[str]:
    """Deletes the named entries, or those unused for `older_than_days`, or all (neither).
    Reads no record, so that a damaged entry is cleared like any other."""
    removed = []
    for entry in entry_folders(cache_dir):
        age_days = (time.time() - index_lib.last_used(entry)) / 86400
        if (names is None or entry.name in names) and \
                (older_than_days is None or age_days > older_than_days):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
