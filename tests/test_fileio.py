"""Atomic writes (fileio): a failed or killed write leaves nothing, a full disk is a one-line
OutputError, and a later write of the same output removes the temporaries of a process that is gone
(never those of a live one)."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mechscope.errors import MechscopeError
from mechscope.fileio import (
    OutputError, atomic_dir, atomic_path, check_parent_writable, check_writable_file, remove_stale_temporaries,
    temporary_prefix, write_json,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def stale(out: Path, pid: int, directory: bool = False, old: bool = False) -> Path:
    """A temporary of `out` named as process `pid` names them (its random part tells files from folders)."""
    path = out.parent / f"{temporary_prefix(out, old=old, pid=pid)}{'dir_0123' if directory else 'file_012'}.tmp"
    if directory:
        path.mkdir()
        (path / "report.html").write_text("half")
    else:
        path.write_text("half")
    return path


def test_a_later_write_removes_the_temporaries_of_a_dead_process_only(tmp_path):
    out = tmp_path / "summary.json"
    gone = dead_pid()
    dead_file, dead_dir = stale(out, gone), stale(out, gone, directory=True)
    live = stale(out, os.getpid())  # this process: alive
    other = tmp_path / f".other.json.{gone}-x.abcd_123.tmp"  # another output's: not ours to judge
    other.write_text("x")
    write_json(out, {"a": 1})
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def test_a_report_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    out = tmp_path / "report"
    old = stale(out, dead_pid(), directory=True, old=True)
    assert remove_stale_temporaries(out) == [] and (out / "report.html").read_text() == "half"
    assert not old.exists()
    again = stale(out, dead_pid(), directory=True, old=True)  # with the report in place it is just removed
    assert remove_stale_temporaries(out) == [again] and not again.exists()


def test_a_write_killed_by_sigkill_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    """A real process killed (SIGKILL: no clean-up runs) in the middle of its write."""
    out = tmp_path / "c.json"
    script = ("import os, signal, mechscope.fileio as f\n"
              "with f.atomic_path(%r) as tmp:\n"
              "    tmp.write_text('{\"half\": ')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n" % str(out))
    killed = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC},
                              stderr=subprocess.PIPE, text=True)
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(temporary_prefix(out, pid=killed.pid)), left
    write_json(out, [1, 2])
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def full_disk(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_is_one_output_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("mechscope.fileio.sync_file", full_disk)
    out = tmp_path / "sub" / "c.json"
    with pytest.raises(OutputError, match=r"c\.json: cannot write there \(no space left on device\)$"):
        write_json(out, {"a": 1})
    assert list((tmp_path / "sub").iterdir()) == []
    report = tmp_path / "report"
    with pytest.raises(OutputError, match=r"report: cannot write there \(no space left on device\)$"):
        with atomic_dir(report) as tmp:
            write_json(tmp / "inner.json", [1])  # the nested write's failure is told as the directory's
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_a_real_write_error_is_an_output_error_and_leaves_nothing(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes write() itself fail, as a full disk does, without root."""
    out = tmp_path / "big.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(OutputError, match=r"big\.json: cannot write there \(file too large\)"):
            write_json(out, list(range(100_000)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    for make in (lambda: atomic_path(tmp_path / "f.json"), lambda: atomic_dir(out)):
        with pytest.raises(KeyboardInterrupt):
            with make() as tmp:
                (tmp / "x" if tmp.is_dir() else tmp).write_text("half")
                raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_checked_before_the_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a_file is not a directory"):
        check_writable_file(blocker / "deeper" / "out.json")
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        check_writable_file(tmp_path)
    check_writable_file(tmp_path / "new" / "deeper" / "out.json")  # made on write
    check_parent_writable(tmp_path / "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the probe is gone
    assert issubclass(OutputError, MechscopeError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_folder_is_found_by_the_check(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            check_writable_file(folder / "out.json")
    finally:
        folder.chmod(0o755)
