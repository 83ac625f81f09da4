"""Crash-safe file writes: write beside the target, fsync, then rename onto it (one helper for the whole project).

A kill -9 or power loss leaves either the old file or the new one, never a half-written file under the real name;
interrupted temp files carry a `.tmp` marker so that the next run can clean them up.
"""
from __future__ import annotations

import json
import os
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
