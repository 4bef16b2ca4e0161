"""Every file qktrace writes: checked before any work, written so that nothing on disk is ever lost.

`check_output(path)` runs before any computing: the parent directory exists and is writable, and the
path is not a directory. `atomic_write(path, data)` (and `atomic_open`, for writers such as
matplotlib) writes to a temporary file created exclusively beside the target -- O_CREAT | O_EXCL |
O_NOFOLLOW, so a planted file or symlink at that name is never opened -- flushes it to disk, and
renames it over the target. A reader sees the old file or the new one, never a part; a process killed
mid-write leaves the old file intact (and a stray `.NAME.*.tmp` beside it). With `overwrite=False` the
new file is published with `os.link`, which fails if the target exists, so nothing is clobbered even
when two writers race.

Problems are `InputError`s naming the path and the fix (the path is the user's input).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import InputError

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_output(path: str | os.PathLike[str], what: str = "output", flag: str = "--out") -> Path:
    """Refuse, before any work, a path that cannot be written: a directory, a missing or read-only parent.

    Returns the path. An existing regular file (or a link to one) is fine: it is replaced atomically.
    """
    p = Path(path).expanduser()
    if not str(path).strip():
        raise InputError(f"{what} path is empty: give a file name to {flag}")
    if p.is_dir():
        raise InputError(f"{what} path {p} is a directory: give a file name inside it, e.g. {p / 'out'}")
    if p.exists() and not p.is_file():
        raise InputError(f"{what} path {p} exists and is not a regular file: choose another {flag}")
    parent = p.parent
    if not parent.exists():
        raise InputError(f"{what} folder {parent} does not exist: create it first or choose another {flag}")
    if not parent.is_dir():
        raise InputError(f"{what} path {p} is inside {parent}, which is not a folder: choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to folder {parent} (permission denied): choose another {flag}")
    return p


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, two outputs (flag -> path, None for not given) that name one file: the
    second write would replace the first."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        real = path.expanduser().resolve()
        if real in seen:
            raise InputError(f"{seen[real]} and {flag} both name {path}: give each its own file")
        seen[real] = flag


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """A folder that exists (or can be created) and is writable, checked before any work."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise InputError(f"output folder is empty: give a folder name to {flag}")
    if p.exists() and not p.is_dir():
        raise InputError(f"output folder {p} exists and is not a folder: choose another {flag}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output folder {p} would be inside {probe}, which is not a folder: choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to folder {probe} (permission denied): choose another {flag}")
    return p


def _temp_beside(target: Path) -> tuple[int, Path]:
    """A new file beside `target`, created exclusively (never an existing file or link)."""
    for _ in range(16):
        tmp = target.parent / f".{target.name[:200]}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink planted at the name: pick another name
                continue
            raise InputError(f"cannot create a file in {target.parent} ({_reason(e)}): choose another path") from None
    raise InputError(f"cannot create a temporary file beside {target}: clear the .*.tmp files in its folder")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, overwrite: bool = True, parents: bool = False) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces `path` only when the block ends without error.

    `overwrite=False`: refuse (InputError) when `path` exists, at the start and at the final publish.
    `parents=True`: create missing folders above `path` first (a job's shard and feature files).
    """
    target = Path(path).expanduser()
    if parents:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create folder {target.parent} ({_reason(e)}): choose another path") from None
    if not overwrite and os.path.lexists(target):
        raise InputError(f"{target} exists: choose another name, or ask to overwrite it")
    fd, tmp = _temp_beside(target)
    published = False
    try:
        try:
            st = os.stat(target)
            if stat.S_ISREG(st.st_mode):
                os.fchmod(fd, stat.S_IMODE(st.st_mode))  # a replaced file keeps its permissions
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, target, overwrite)
        published = True
    except OSError as e:
        raise InputError(f"cannot write {target} ({_reason(e)}): free space or choose another path") from None
    finally:
        if not published:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)  # fails if target exists, atomically
        except FileExistsError:
            raise InputError(f"{target} exists: choose another name, or ask to overwrite it") from None
        os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(
    path: str | os.PathLike[str], data: str | bytes, *, overwrite: bool = True, parents: bool = False
) -> Path:
    """Write `data` (str as UTF-8) to `path` through a temporary file and a rename; returns the path.
    `overwrite`, `parents`: as `atomic_open` takes them."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_open(path, overwrite=overwrite, parents=parents) as f:
        f.write(raw)
    return Path(path).expanduser()
