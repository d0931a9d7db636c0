"""Writing outputs safely: atomically, and never into a user's model directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputPathError


def check_writable(path: str | Path) -> None:
    """Fail early, before slow work, when `path` could not be written."""
    path = Path(path)
    parent = path.parent
    blocking_file = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking_file is not None:
        raise OutputPathError(f"cannot write {path}: {blocking_file} is a file, not a directory; choose another path")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputPathError(f"cannot create directory {parent} for {path}: {e.strerror}; choose another path") from None
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write to {parent}: permission denied; choose another output path")


def refuse_inside(path: str | Path, protected: list[Path]) -> None:
    """Refuse to write `path` when it is, is inside, or contains one of the protected directories
    (an output directory replaced with --force is deleted first, with everything in it)."""
    target = Path(path).expanduser().resolve()
    for directory in protected:
        directory = Path(directory).expanduser().resolve()
        if target == directory or directory in target.parents:
            raise OutputPathError(
                f"refusing to write {path}: it is inside the model directory {directory} (or is the model); "
                "choose an output path elsewhere"
            )
        if target in directory.parents:
            raise OutputPathError(
                f"refusing to write {path}: it contains the model directory {directory}, which replacing it "
                "would delete; choose an output path elsewhere"
            )


def refuse_current_directory(path: str | Path) -> None:
    """Refuse an output directory that is or contains the current one: replacing it would leave
    the shell in a deleted directory."""
    target, cwd = Path(path).expanduser().resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"{path} is the current directory or contains it; give --out a new directory name")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    An interrupted or failed write leaves nothing at `path`. An existing non-empty `path` is
    refused unless `force`.
    """
    path = Path(path).expanduser().resolve()
    refuse_current_directory(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputPathError(f"{path} exists and is not empty; choose another --out or pass --force to replace it")
    check_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
