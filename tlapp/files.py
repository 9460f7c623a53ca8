"""Writing files so that a crash never leaves half of one: atomic writes, checksums, locks."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from tlapp.errors import DiskFullError, UserInputError

MARKER = ".tlapp"  # written into every folder tlapp owns as a whole (exports, evaluations)


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


def is_disk_full(error: BaseException) -> bool:
    """True for an error that means the disk (or quota) is full: ENOSPC and EDQUOT, and the
    short writes that numpy (`N requested and M written`) and HDF5 report without an errno."""
    if not isinstance(error, OSError):
        return False
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return bool(re.search(r"\d+ requested and \d+ written", text)) or any(
        phrase in text for phrase in ("No space left on device", "Disk quota exceeded",
                                      f"errno = {errno.ENOSPC},"))


def disk_full(folder: str | os.PathLike, what: str, advice: str = "") -> DiskFullError:
    """The error for a full disk while writing `what` ("the feature cache") in `folder`."""
    return DiskFullError(f"The disk holding {what} is full ({folder}). " + (
        advice or "Free some space or choose a folder on another disk."))


def owned_kind(folder: Path) -> str | None:
    """The kind of tlapp folder (`write_folder`'s `kind`) `folder` is, from its marker."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_folder_target(target: Path, kind: str, overwrite: bool,
                        owned: Callable[[Path], bool] | None = None) -> None:
    """Refuses a target tlapp may not replace: a file, or a non-empty folder that is not a
    tlapp `kind` folder (by its marker, or `owned(target)` for folders written before
    markers), or one that is but without `overwrite`.

    Raises:
        UserInputError: saying what the target holds and what to do.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target} is a file; give a folder for the {kind} (a new or "
                             f"empty one). Received: out={str(target)!r}")
    if target.is_dir() and any(target.iterdir()):
        if owned_kind(target) != kind and not (owned and owned(target)):
            raise UserInputError(
                f"{target} is not empty and does not hold a tlapp {kind}; tlapp never deletes "
                f"what it did not write. Choose a new or empty folder. Received: "
                f"out={str(target)!r}")
        if not overwrite:
            raise UserInputError(f"{target} already holds a tlapp {kind}. Pass --overwrite to "
                                 f"replace it, or choose another folder.")


def write_folder(target: str | os.PathLike, write: Callable[[Path], Any], kind: str,
                 overwrite: bool = False, owned: Callable[[Path], bool] | None = None) -> Path:
    """Writes a folder tlapp owns as a whole: `write(temp)` fills a temporary sibling, which
    then takes the target's place (a previous one of the same kind is replaced only with
    `overwrite`; see `check_folder_target`). A failure leaves the target as it was.
    """
    target = Path(target)
    check_folder_target(target, kind, overwrite, owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f".tlapp-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    temp, old = target.parent / f"{token}.partial", target.parent / f"{token}.old"
    try:
        temp.mkdir()
        write(temp)
        (temp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        if target.exists():
            os.rename(target, old)
        os.rename(temp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.rename(old, target)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
