"""Crash-safe file writes: write beside the target, fsync, then rename onto it (one helper for the whole project).

A kill -9 or power loss leaves either the old file or the new one, never a half-written file under the real name;
interrupted temp files carry a `.tmp` marker so that the next run can clean them up.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def fsync_path(path: Path) -> None:
    """fsync one file or directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (children first), then root itself."""
    for p in sorted(Path(root).rglob("*"), reverse=True) + [Path(root)]:
        fsync_path(p)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """write(tmp_path) into a temp file beside `path`, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_tree(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON (indent 2; non-JSON values through str) written atomically."""
    payload = json.dumps(obj, indent=2, default=str)
    return atomic_write(path, lambda p: p.write_text(payload))


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap a fully written tmp dir onto target (a dir cannot be os.replace'd over a non-empty one: rename aside)."""
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------- disk and permission faults, as one sentence each

WRITE_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


class WriteError(RuntimeError):
    """A write that the disk refused (full, read-only, no permission): one sentence with the folder and the sizes."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line for a user's message: its type and the first line of its text, at most `limit` chars."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}"[:limit] if text else type(e).__name__


def human_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the file system of folder (or of its nearest existing parent); None if unknown."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def fault_errno(exc: BaseException) -> int | None:
    """The errno of a disk or permission fault behind exc (an OSError, or a library error quoting 'os error 28'), else None."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if code is None:
            m = _OS_ERROR.search(str(e))
            code = int(m.group(1) or m.group(2)) if m else None
        if code in WRITE_FAULTS:
            return code
    return None


def write_fault(exc: BaseException, folder: str | Path, need: int | None = None, what: str = "files") -> WriteError | None:
    """exc as one WriteError sentence (folder, free space, what the write needed) if it is a disk fault, else None."""
    code = fault_errno(exc)
    if code is None:
        return None
    folder = Path(folder)
    needed = f", and this write needed about {human_bytes(need)}" if need else ""
    fix = ("free some space there (or choose another --output-dir), then continue the run with --resume latest"
           if code in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable, or choose another --output-dir")
    return WriteError(f"cannot write {what} in {folder}: {WRITE_FAULTS[code]} ({human_bytes(free_bytes(folder))} free"
                      f"{needed}); {fix}")


def check_free(folder: str | Path, need: int, what: str) -> None:
    """WriteError before a write of about `need` bytes that the folder's file system cannot hold."""
    free = free_bytes(folder)
    if free is not None and free < need:
        raise WriteError(f"cannot write {what} in {folder}: it needs about {human_bytes(need)} and only "
                         f"{human_bytes(free)} is free there; free some space (or choose another --output-dir), "
                         "then continue the run with --resume latest")
