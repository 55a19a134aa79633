"""Atomic file writes: results are written beside their destination and renamed into place, so an
interrupted or failed write never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
def atomic_dir(out: str | os.PathLike, error=OSError, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out` (which must be new or empty); on success rename it to
    `out`, so a failure leaves no partial output. `error` is the exception class raised when the
    directory cannot be made. With `replace`, an existing directory `out` is swapped out only once the
    new one is complete (renamed aside, the new one renamed in, then the old one deleted; put back if
    the swap fails)."""
    import shutil

    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as exc:
        raise error(f"{out}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield tmp
        if replace and out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
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
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
