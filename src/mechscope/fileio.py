"""Atomic file writes: results are written beside their destination and renamed into place, so an
interrupted or failed write never leaves a half-written file.

A temporary's name says whose it is: `.{name}.{pid}-{host}.{random}.tmp` beside the output `name`.
A run that writes `name` again removes the temporaries of `name` left by a process of this host that
is gone (killed before it could clean up); those of a live process are never touched."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import MechscopeError


class OutputError(MechscopeError, OSError):
    """An output that cannot be written: the message names it and says why (`reason`, for a failed
    write)."""

    reason: str | None = None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def temporary_prefix(path: Path, old: bool = False, pid: int | None = None) -> str:
    """The start of a temporary's name for output `path`: its owner's pid (this process's by default)
    and host."""
    return f".{path.name}.{os.getpid() if pid is None else pid}-{_host()}." + ("old." if old else "")


def _owner_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of output `path` whose owner (a process of this host) is gone; return them.
    A previous directory that a killed `atomic_dir(replace=True)` had moved aside, with nothing in its
    place, is put back rather than removed."""
    path = Path(path)
    parent = path.parent
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-" + re.escape(_host())
                         + r"\.(old\.)?[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or not _owner_gone(int(match.group(1))):
            continue
        try:
            if match.group(2) and entry.is_dir() and not os.path.lexists(path):
                os.replace(entry, path)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another run got there first, or it cannot be removed: leave it
    return removed


def reason(exc: OSError) -> str:
    """Why an OS call failed, in lower case: 'no space left on device'."""
    text = getattr(exc, "reason", None) or exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _fail(exc: OSError, path: Path, error: type[Exception]) -> Exception:
    """The one-line error for a failed write of `path`; a nested write's failure is told as this
    one's, and any other MechscopeError is already the user's message and passes through."""
    if isinstance(exc, MechscopeError) and getattr(exc, "reason", None) is None:
        return exc
    failure = error(f"{path}: cannot write there ({reason(exc)})")
    failure.reason = reason(exc)
    return failure


def check_parent_writable(out: str | os.PathLike, error: type[Exception] = OutputError) -> None:
    """Raise `error` unless output `out` can be created: its nearest existing ancestor must be a directory
    in which a file can be made (tried, not just asked: permissions, read-only mounts and ACLs all show).
    Stale temporaries of `out` are removed on the way."""
    out = Path(out)
    probe = out.parent
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_dir = probe.is_dir()
    except OSError as exc:  # a folder on the way that cannot be searched
        raise error(f"{out}: cannot write there ({reason(exc)})") from None
    if not is_dir:
        raise error(f"{out}: cannot write there ({probe} is not a directory)")
    try:
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(out), suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise error(f"{out}: cannot write there ({probe}: {reason(exc)})") from None
    if probe == out.parent:
        remove_stale_temporaries(out)


def check_writable_file(out: str | os.PathLike, error: type[Exception] = OutputError) -> None:
    """Raise `error` unless the file `out` can be written (checked before any model work)."""
    out = Path(out)
    if out.is_dir():
        raise error(f"{out}: is a directory; give a file name")
    check_parent_writable(out, error)


def sync_file(path: Path) -> None:
    """Flush a written file to the disk: a full disk or an I/O error shows here at the latest."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success rename it to `path`. A failure
    to write (a full disk, a vanished folder) raises OutputError naming `path`; the temporary is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal file's mode
        sync_file(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise _fail(exc, path, OutputError) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, atomically."""
    import json

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path


@contextmanager
def atomic_dir(out: str | os.PathLike, error=OutputError, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out` (which must be new or empty); on success rename it to
    `out`, so a failure leaves no partial output. `error` is the exception class raised when the
    directory cannot be made or written (a full disk). With `replace`, an existing directory `out` is
    swapped out only once the new one is complete (renamed aside, the new one renamed in, then the old
    one deleted; put back if the swap fails)."""
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), suffix=".tmp", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as exc:
        raise _fail(exc, out, error) from None
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                sync_file(file)
        if replace and out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, old=True), suffix=".tmp", dir=parent))
            os.replace(out, old)  # an empty directory as the target of a directory rename is replaced
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except OSError as exc:
        raise _fail(exc, out, error) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
