"""Files in and out: the readers that name the file at fault, and writes that lose no work.

Every JSON file the project reads goes through `read_json`, so a missing or malformed file is
one clear error naming the path and what was expected.


Checkpoints, converted base models and cached dataset images are all written the same way: into
a hidden temporary sibling, flushed to disk, then renamed into place. A crash or a kill mid-write
leaves the previous complete directory (or none) under the final name, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is an error that names it and `what` it should hold."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from e


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """Write JSON by rename (a reader never sees half a file)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def fsync_tree(path: Path) -> None:
    """Flush every file directly under `path` to disk (the rename is the commit point)."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `directory` in one rename.

    On an exception the temporary directory is removed and `directory` is left as it was, so a
    failed run never overwrites or removes a good earlier result.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write one file by rename, so a reader never sees it half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.rename(path)
    return path
