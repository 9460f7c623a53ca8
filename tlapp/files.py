"""Writing files so that a crash never leaves half of one: atomic writes, checksums, locks."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from tlapp.errors import DiskFullError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Calls write(temp_path), then renames the temp file onto `path`; the temp file is
    removed whatever happens, so `path` is either the old file or the whole new one."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=1) + "\n"))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(folder: Path):
    """An exclusive lock on `folder`/.lock for the duration of the block (same host only)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_disk_full(error: OSError) -> bool:
    """ENOSPC or EDQUOT, or numpy's short write ("N requested and M written", no errno),
    which is how np.save and ndarray.tofile report a full disk."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return error.errno is None and bool(re.search(r"\d+ requested and \d+ written",
                                                  str(error)))


def disk_full(folder: str | os.PathLike, what: str, advice: str = "") -> DiskFullError:
    """The error for a full disk while writing `what` ("the feature cache") in `folder`."""
    return DiskFullError(f"The disk holding {what} is full ({folder}). " + (
        advice or "Free some space or choose a folder on another disk."))
