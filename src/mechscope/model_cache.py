"""Entries of the model cache: built once, recorded file by file, checked on every load, rebuilt when
damaged.

An entry is a folder (a converted model) with a manifest, `mechscope.json`, that records the size and
sha256 of every other file in it. `ensure_entry` returns an entry only once all its files match the
manifest; an entry that does not (bytes changed, a file truncated or missing, no manifest, or a
manifest of an older format without hashes) is moved aside and rebuilt, with a message saying why.

Every load hashes the whole entry. That costs about a second per GB (0.6 s for the 540 MB SmolLM2
entry on a CPU with SHA instructions, about 5% of loading it) on top of a load that reads the same
bytes anyway. We chose it over a cheaper stamp (sizes, mtimes and inode numbers recorded after a
verified hash, with the full hash only when the stamp changes) because a stamp misses damage that
keeps the metadata: bit rot, a fault below the file system, a copy or a tool that restores mtimes.
A damaged entry must never reach the model as silent NaNs or wrong numbers.

Entries are built in a temporary folder beside them and renamed into place, so a reader never sees
half an entry. A conversion killed outright (SIGKILL, a power cut) cannot remove its temporaries, so
each later call removes them: a temporary is named `.tmp-<entry>@<host>@<pid>@<random>` and is
removed once that process is gone (on this host), or once untouched for `STALE_AFTER_S` (one from
another host, or of an older mechscope). The converting process also holds a lock (flock) on its
temporaries, which the system releases however the process ends; a locked temporary is never
removed, so a live concurrent conversion keeps its own even where its pid cannot be checked (another
pid namespace under the same host name).

Files and folders follow the user's umask (the temporary folders of `tempfile` would make them
private), so a cache shared between users is readable by all of them. A cache that cannot be written
is fine as long as its entries are intact; when one has to be built there, the error says to point
`MECHSCOPE_CACHE` at a writable folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError
from .fileio import current_umask

MANIFEST = "mechscope.json"
# Format of the manifest. Format 1 (mechscope 0.1) recorded no file sizes or hashes; such an entry
# cannot be checked, so it is rebuilt once in place.
FORMAT = 2
# A temporary whose owner cannot be checked is removed once nothing in it has changed for this long
# (a conversion writes its files continuously, and the largest takes minutes, not hours).
STALE_AFTER_S = 6 * 3600
TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20
_WRITABLE_HINT = "set MECHSCOPE_CACHE to a writable folder"


def say(message: str) -> None:
    """A progress or repair message, on one stderr line."""
    print(f"mechscope: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Recording and checking an entry
# --------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for every file under `folder` except the manifest."""
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def entry_problem(entry: Path) -> str | None:
    """Why `entry` cannot be used as it is (a short phrase), or None when every file matches its
    manifest. Raises ModelLoadError when the entry cannot even be read."""
    try:
        text = (entry / MANIFEST).read_text()
    except (FileNotFoundError, NotADirectoryError):
        if entry.is_dir():
            return f"it has no {MANIFEST}"
        return "it is a file, not a folder" if entry.exists() else "missing"
    except OSError as exc:
        raise _unreadable(entry, exc) from None
    try:
        manifest = json.loads(text)
        files = manifest["files"] if manifest.get("format") == FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is not valid"
    if files is None:
        return "it was written by an older mechscope and records no file hashes"
    if not isinstance(files, dict) or not files:
        return f"its {MANIFEST} lists no files"
    try:
        for name, expected in files.items():  # sizes first: a truncated file is found without reading
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size:,} bytes, not the {expected['size']:,} recorded"
        for name, expected in files.items():
            if sha256_of(entry / name) != expected["sha256"]:
                return f"the bytes of {name} differ from those recorded when it was written"
    except OSError as exc:
        raise _unreadable(entry, exc) from None
    except (KeyError, TypeError):
        return f"its {MANIFEST} is not valid"
    return None


def _unreadable(entry: Path, exc: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read the cached model {entry} ({exc.strerror or exc}); fix its permissions, delete it, "
        f"or {_WRITABLE_HINT}"
    )


# --------------------------------------------------------------------------------------------------
# Temporaries: named by their owner, reclaimed once it is gone
# --------------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def temp_name(entry_name: str) -> str:
    return f"{TEMP_PREFIX}{entry_name}@{_host()}@{os.getpid()}@{secrets.token_hex(4)}"


def make_temp(parent: Path, entry_name: str) -> Path:
    """A new empty folder in `parent`, owned by this process (mode from the umask)."""
    path = parent / temp_name(entry_name)
    path.mkdir()
    return path


def _owner_gone(name: str) -> bool | None:
    """True when the process that made temporary `name` has ended, False while it runs, None when
    that cannot be told (another host, an unparsable name, or no way to probe processes)."""
    parts = name.rsplit("@", 3)
    if len(parts) != 4 or parts[1] != _host() or not parts[2].isdigit() or os.name != "posix":
        return None
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, owned by another user
        return False
    return False


def _try_lock(folder: Path) -> tuple[int | None, bool]:
    """(file descriptor holding an exclusive lock on `folder`, or None; whether another process
    holds it). Both are empty where locks are not available."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        return None, isinstance(exc, BlockingIOError)
    return fd, False


def hold(folder: Path) -> int | None:
    """Lock `folder` for this process; returns the file descriptor to close when done."""
    return _try_lock(folder)[0]


def _held_by_a_process(folder: Path) -> bool:
    fd, busy = _try_lock(folder)
    if fd is not None:
        os.close(fd)
    return busy


def _last_change(path: Path) -> float:
    latest = path.lstat().st_mtime
    for child in path.rglob("*"):
        try:
            latest = max(latest, child.lstat().st_mtime)
        except OSError:
            pass
    return latest


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def reclaim_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` left by conversions that ended without cleaning up (see the
    module docstring); returns what was removed. Best effort: what cannot be removed stays."""
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        try:
            if _held_by_a_process(path):
                continue
            gone = _owner_gone(path.name)
            if gone is False or (gone is None and now - _last_change(path) < STALE_AFTER_S):
                continue
            size = _size(path)
        except OSError:
            continue
        _remove(path)
        if not path.exists():
            removed.append(path)
            if size:  # an empty one (the scratch folder of most conversions) is not worth a line
                say(f"removed {path} ({size / 1e6:,.1f} MB), left by a model conversion that did not finish")
    return removed


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a new one would get under the umask."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _write_manifest(folder: Path, meta: dict) -> None:
    manifest = {**meta, "format": FORMAT, "files": record_files(folder)}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    os.chmod(path, 0o666 & ~current_umask())


def _cannot_write(where: Path, exc: OSError) -> ModelLoadError:
    return ModelLoadError(f"cannot write the model cache at {where} ({exc.strerror or exc}); {_WRITABLE_HINT}")


def build_entry(entry: Path, build: Callable[[Path, Path], dict]) -> Path:
    """Run `build(folder, scratch)`, which writes the entry's files into `folder` (`scratch` is a
    folder for intermediate files) and returns the manifest's metadata; record the files and rename
    the folder to `entry`. Nothing is left behind when it fails or is interrupted."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp(entry.parent, entry.name)
    except OSError as exc:
        raise _cannot_write(entry.parent, exc) from None
    locks = [hold(tmp)]
    scratch = None
    try:
        try:
            scratch = make_temp(entry.parent, entry.name)
            locks.append(hold(scratch))
            meta = build(tmp, scratch)
            _follow_umask(tmp)
            _write_manifest(tmp, meta)
        except OSError as exc:
            raise _cannot_write(entry.parent, exc) from None
        try:
            os.replace(tmp, entry)
        except OSError as exc:
            # Another process finished the same entry first; theirs is as good as ours.
            if not (entry / MANIFEST).is_file():
                raise _cannot_write(entry.parent, exc) from None
    finally:
        for path in (tmp, scratch):
            if path is not None:
                _remove(path)
        for fd in locks:
            if fd is not None:
                os.close(fd)
    return entry


def ensure_entry(entry: Path, build: Callable[[Path, Path], dict]) -> Path:
    """The cache entry `entry`, checked against its manifest; built with `build` (see `build_entry`)
    when missing, rebuilt when damaged. Stale temporaries beside it are removed first."""
    reclaim_stale_temps(entry.parent)
    problem = entry_problem(entry)
    if problem is None:
        return entry
    if problem != "missing":
        say(f"the cached model {entry} cannot be used: {problem}; rebuilding it")
        _set_aside(entry, problem)
    return build_entry(entry, build)


def _set_aside(entry: Path, problem: str) -> None:
    """Move a damaged entry out of the way (to a temporary of ours) and delete it."""
    aside = entry.parent / temp_name(entry.name)
    try:
        os.replace(entry, aside)
    except FileNotFoundError:
        return  # another process set it aside first
    except OSError as exc:
        raise ModelLoadError(
            f"the cached model {entry} is damaged ({problem}) and cannot be rebuilt there "
            f"({exc.strerror or exc}); delete it, or {_WRITABLE_HINT}"
        ) from None
    _remove(aside)
