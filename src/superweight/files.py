"""Writing outputs safely: atomically, and never into a user's model directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputPathError


def output_file(path: str | os.PathLike | None) -> Path | None:
    """`path` (an option's text) as a file to write, None when not given. A name ending in '/' means
    a folder, and pathlib drops that '/': `--out results/` would become a file named 'results'."""
    if path is None or os.fspath(path) == "":
        return None
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        raise OutputPathError(f"{text} ends in '/', so it names a folder, but this output is a file; give a file name "
                              f"(e.g. {text}NAME)")
    return Path(text)


def check_writable(path: str | Path) -> None:
    """Fail early, before slow work, when `path` could not be written."""
    path = Path(path)
    parent = path.parent
    blocking_file = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking_file is not None:
        raise OutputPathError(f"cannot write {path}: {blocking_file} is a file, not a directory; choose another path")
    if not parent.exists():  # a typo in a path must not leave new folders behind
        raise OutputPathError(f"cannot write {path}: the folder {parent} does not exist; create it first "
                              f"(mkdir -p {parent}) or choose another path")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write to {parent}: permission denied; choose another output path")
    try:
        _create_a_file_in(parent, prefix=f".{path.name}.")  # the kind the atomic write makes
    except OSError as e:
        raise OutputPathError(f"cannot write to {parent} ({e.strerror or type(e).__name__}); choose another "
                              "output path") from None


def _create_a_file_in(folder: Path, prefix: str) -> None:
    """Create a file in `folder` and remove it: OSError where that fails. os.access says yes to root,
    and on a read-only mount or a system folder (/proc), where creating a file still fails."""
    fd, probe = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


def cache_folder(path: str | Path) -> Path:
    """`path`, a folder of the cache (SUPERWEIGHT_CACHE), created if need be; one that cannot be
    created or written (the variable names a file, a read-only place) is refused in one line before
    slow work is done for it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _create_a_file_in(path, prefix=".write-check.")
    except OSError as e:
        raise OutputPathError(f"cannot write the cache folder {path} ({e.strerror or type(e).__name__}); point "
                              "SUPERWEIGHT_CACHE (or --cache-dir) at a writable folder") from None
    return path


def refuse_inside(path: str | Path, protected: dict[Path, str]) -> None:
    """Refuse to write `path` when it is, is inside, or contains one of the `protected` directories
    or files (each with what it is: "the model directory", ...); an output directory replaced with
    --force is deleted first, with everything in it."""
    target = Path(path).expanduser().resolve()
    for location, what in protected.items():
        location = Path(location).expanduser().resolve()
        if target == location and location.is_file():
            raise OutputPathError(f"refusing to write {path}: it is {what} {location}, which writing it would "
                                  "replace; choose an output path elsewhere")
        if target == location or location in target.parents:
            raise OutputPathError(
                f"refusing to write {path}: it is inside {what} {location} (or is it); choose an output path elsewhere"
            )
        if target in location.parents:
            raise OutputPathError(
                f"refusing to write {path}: it contains {what} {location}, which replacing it would delete; "
                "choose an output path elsewhere"
            )


def refuse_current_directory(path: str | Path) -> None:
    """Refuse an output directory that is or contains the current one: replacing it would leave
    the shell in a deleted directory."""
    target, cwd = Path(path).expanduser().resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"{path} is the current directory or contains it; give --out a new directory name")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _give_default_modes(root: Path) -> None:
    """mkstemp, mkdtemp and safetensors create 0600/0700 entries; an output should get the mode
    any new file or folder of the user gets (0644/0755 under umask 022)."""
    umask = _umask()
    for entry in (root, *(root.rglob("*") if root.is_dir() else ())):
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a directory; give a file name")
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _give_default_modes(Path(tmp))
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
    try:
        yield tmp
        _give_default_modes(tmp)
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
