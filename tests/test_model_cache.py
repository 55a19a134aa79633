"""The model cache: a tiny Llama written as a real GGUF file is converted through the real code path
into a cache under tmp_path, then damaged as a disk or an interrupted run would damage it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import save_llama_gguf

import mechscope
from mechscope import model_cache
from mechscope.errors import ModelLoadError
from mechscope.models import _cache_dir_for, _cached_hf_dir_for_gguf, _file_fingerprint, load_hf, resolve_spec

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def gguf(tmp_path, tiny_model_dirs, monkeypatch) -> Path:
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    return save_llama_gguf(tmp_path / "tiny.gguf", tiny_model_dirs["llama"])


def convert(gguf: Path) -> Path:
    kind, location = resolve_spec(str(gguf))
    assert kind == "gguf"
    return Path(location)


def temporaries(entry: Path) -> list[str]:
    return sorted(p.name for p in entry.parent.iterdir() if p.name.startswith("."))


def assert_same_model(entry: Path, source: Path) -> None:
    """The cached model's logits are finite and equal those of the model the GGUF was written from."""
    model, tokenizer = load_hf(entry)
    reference, _ = load_hf(source)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def owned_by(pid: int, entry_name: str) -> str:
    """A temporary's name as process `pid` on this host would choose it."""
    return model_cache.temp_name(entry_name).replace(f"@{os.getpid()}@", f"@{pid}@")


# --------------------------------------------------------------------------------------------------
# A sound entry
# --------------------------------------------------------------------------------------------------


def test_conversion_records_size_and_hash_of_every_file(gguf, tiny_model_dirs, capsys):
    entry = convert(gguf)
    assert "converting tiny.gguf to float32 once" in capsys.readouterr().err
    manifest = json.loads((entry / "mechscope.json").read_text())
    files = {p.name for p in entry.iterdir()} - {"mechscope.json"}
    assert "model.safetensors" in files and set(manifest["files"]) == files
    for name, record in manifest["files"].items():
        data = (entry / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert temporaries(entry) == []
    assert_same_model(entry, tiny_model_dirs["llama"])

    inode = (entry / "model.safetensors").stat().st_ino
    assert convert(gguf) == entry
    assert "mechscope:" not in capsys.readouterr().err  # checked and reused: nothing converted, nothing said
    assert (entry / "model.safetensors").stat().st_ino == inode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_entry_modes_follow_the_umask(gguf, umask):
    old = os.umask(umask)
    try:
        entry = convert(gguf)
    finally:
        os.umask(old)
    for path in [entry, *entry.iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path.name, oct(path.stat().st_mode))


# --------------------------------------------------------------------------------------------------
# Damaged entries are rebuilt, with a message saying why
# --------------------------------------------------------------------------------------------------


def flip_bytes_keeping_mtime(entry: Path) -> None:
    """Overwrite 64 KiB in the middle of the weights with their complement, then put the file's
    modification time back, as a copy or a disk fault might leave it."""
    path = entry / "model.safetensors"
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(before.st_size // 2)
        chunk = f.read(1 << 16)
        f.seek(before.st_size // 2)
        f.write(bytes(255 - b for b in chunk))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def truncate(entry: Path) -> None:
    os.truncate(entry / "model.safetensors", 4096)


def older_format(entry: Path) -> None:
    (entry / "mechscope.json").write_text(json.dumps({"source": "x.gguf", "fingerprint": "x", "format": 1}))


DAMAGE = {
    "flipped bytes": (flip_bytes_keeping_mtime, "the bytes of model.safetensors differ from those recorded"),
    "truncated weights": (truncate, "model.safetensors has 4,096 bytes, not the"),
    "no manifest": (lambda e: (e / "mechscope.json").unlink(), "it has no mechscope.json"),
    "manifest not JSON": (lambda e: (e / "mechscope.json").write_text("{"), "its mechscope.json is not valid"),
    "tokenizer missing": (lambda e: (e / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "older format": (older_format, "it was written by an older mechscope and records no file hashes"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_entry_is_rebuilt(gguf, tiny_model_dirs, capsys, damage):
    harm, reason = DAMAGE[damage]
    entry = convert(gguf)
    capsys.readouterr()
    harm(entry)
    assert model_cache.entry_problem(entry) is not None

    assert convert(gguf) == entry
    err = capsys.readouterr().err
    assert f"the cached model {entry} cannot be used: {reason}" in err
    assert "rebuilding it" in err and "converting tiny.gguf" in err
    assert model_cache.entry_problem(entry) is None
    assert temporaries(entry) == []
    assert_same_model(entry, tiny_model_dirs["llama"])

    convert(gguf)
    assert "mechscope:" not in capsys.readouterr().err  # healed once, not on every run


def test_model_loaded_after_a_rebuild_gives_finite_probabilities(gguf, tiny_model_dirs):
    entry = convert(gguf)
    flip_bytes_keeping_mtime(entry)
    bridge = mechscope.load_model(str(gguf), device="cpu")
    with torch.no_grad():
        logits = bridge(PROMPT)[0, -1]
    assert torch.isfinite(logits).all()
    reference = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    with torch.no_grad():
        assert torch.allclose(logits, reference(PROMPT)[0, -1], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Temporaries of conversions that did not finish
# --------------------------------------------------------------------------------------------------


def make_leftover(folder: Path, name: str, age_s: float = 0.0) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * 100_000)
    if age_s:
        then = time.time() - age_s
        for p in (path / "model.safetensors", path):
            os.utime(p, (then, then))
    return path


LOCK_AND_WAIT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_leftover_temporaries_are_reclaimed_but_live_ones_kept(gguf, capsys):
    models = Path(os.environ["MECHSCOPE_CACHE"]) / "models"
    stale = model_cache.STALE_AFTER_S + 60
    sleeper = subprocess.Popen(["sleep", "60"])
    # A live conversion whose pid this process cannot see (another pid namespace, same host name):
    # its name says a process that has ended, but it holds the lock on its temporary.
    unseen = make_leftover(models, owned_by(dead_pid(), "tiny-0123"), stale)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(unseen)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    try:
        removed = [
            make_leftover(models, owned_by(dead_pid(), "tiny-0123")),  # its process has ended
            make_leftover(models, ".tmp-tiny-0123-k2j4h5", stale),  # older mechscope
            make_leftover(models, ".tmp-tiny-0123@otherhost@12@00ff00ff", stale),  # other host, long untouched
        ]
        kept = [
            make_leftover(models, owned_by(sleeper.pid, "tiny-0123")),  # its process still runs
            make_leftover(models, owned_by(sleeper.pid, "tiny-0123"), stale),  # however old
            make_leftover(models, ".tmp-tiny-0123-a8c7d6"),  # older mechscope, recent
            make_leftover(models, ".tmp-tiny-0123@otherhost@12@11ee11ee"),  # other host, recent
            unseen,
        ]
        entry = convert(gguf)
        err = capsys.readouterr().err
    finally:
        for process in (sleeper, holder):
            process.kill()
            process.wait()
    assert not any(p.exists() for p in removed)
    assert all(p.exists() for p in kept)
    for path in removed:
        assert f"removed {path} (0.1 MB), left by a model conversion that did not finish" in err
    assert model_cache.entry_problem(entry) is None


def test_empty_leftover_is_removed_without_a_word(tmp_path, capsys):
    empty = tmp_path / owned_by(dead_pid(), "tiny-0123")
    empty.mkdir()
    assert model_cache.reclaim_stale_temps(tmp_path) == [empty]
    assert not empty.exists() and capsys.readouterr().err == ""


KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from mechscope import model_cache

def dies_while_saving(folder, scratch):
    (scratch / "model.gguf").write_bytes(bytes(1 << 20))
    (folder / "model.safetensors").write_bytes(bytes(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)

model_cache.ensure_entry(Path(sys.argv[1]), dies_while_saving)
"""


def test_conversion_killed_outright_is_cleaned_up_by_the_next_run(gguf, tiny_model_dirs, capsys):
    """A process killed with no chance to clean up (SIGKILL, or SIGTERM where nothing handles it)
    leaves its temporaries; the next run removes them and converts."""
    entry = _cache_dir_for(gguf.stem, _file_fingerprint(gguf))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(entry)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 2 and not entry.exists()

    assert convert(gguf) == entry
    err = capsys.readouterr().err
    assert all(f"removed {p} (1.0 MB), left by a model conversion that did not finish" in err for p in left)
    assert temporaries(entry) == []
    assert_same_model(entry, tiny_model_dirs["llama"])


def test_interrupted_conversion_leaves_nothing(gguf, monkeypatch):
    """KeyboardInterrupt (and SIGTERM, which the CLI turns into one) runs the clean-up."""
    from mechscope import models

    real = models._dequantize_gguf_to

    def interrupted(path, target):
        real(path, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantize_gguf_to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(gguf)
    assert list((Path(os.environ["MECHSCOPE_CACHE"]) / "models").iterdir()) == []


def test_two_conversions_of_the_same_model_at_once(gguf, tiny_model_dirs, capsys):
    """Another process finishes the entry while this one converts: both end with the one entry."""

    entry = _cache_dir_for(gguf.stem, _file_fingerprint(gguf))

    def locate_while_another_converts(scratch: Path) -> Path:
        assert convert(gguf) == entry  # the other process, start to finish
        return gguf

    assert _cached_hf_dir_for_gguf(gguf.stem, _file_fingerprint(gguf), locate_while_another_converts) == entry
    assert capsys.readouterr().err.count("converting tiny.gguf") == 2
    assert model_cache.entry_problem(entry) is None
    assert temporaries(entry) == []
    assert_same_model(entry, tiny_model_dirs["llama"])


# --------------------------------------------------------------------------------------------------
# A cache that cannot be written
# --------------------------------------------------------------------------------------------------


def test_cache_path_blocked_by_a_file_is_one_clear_error(gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MECHSCOPE_CACHE", str(blocker))
    with pytest.raises(ModelLoadError) as info:
        convert(gguf)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write the model cache at {blocker / 'models'}")
    assert message.endswith("set MECHSCOPE_CACHE to a writable folder")
    assert blocker.read_text() == ""


needs_permissions = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root reads and writes whatever the permission bits say"
)


@needs_permissions
def test_empty_read_only_cache_is_one_clear_error(gguf, tmp_path):
    cache = Path(os.environ["MECHSCOPE_CACHE"])
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(ModelLoadError, match="set MECHSCOPE_CACHE to a writable folder") as info:
            convert(gguf)
        assert "Permission denied" in str(info.value)
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


@needs_permissions
def test_read_only_cache_serves_sound_entries_and_names_damaged_ones(gguf, tiny_model_dirs):
    entry = convert(gguf)
    cache = Path(os.environ["MECHSCOPE_CACHE"])
    folders = [cache, entry.parent, entry]
    for folder in folders:
        folder.chmod(0o555)
    try:
        assert convert(gguf) == entry
        assert_same_model(entry, tiny_model_dirs["llama"])
        entry.chmod(0o755)
        truncate(entry)
        entry.chmod(0o555)
        with pytest.raises(ModelLoadError, match="is damaged .* and cannot be rebuilt there") as info:
            convert(gguf)
        assert "delete it, or set MECHSCOPE_CACHE to a writable folder" in str(info.value)
    finally:
        for folder in folders:
            folder.chmod(0o755)


def _read_only_mount_works() -> bool:
    if sys.platform != "linux" or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mount_works(), reason="needs `unshare -m` and mount (root on Linux)")
def test_empty_cache_on_a_read_only_file_system_is_one_line(gguf, tmp_path):
    """The CLI on a cache folder mounted read-only (EROFS, which even root cannot write)."""
    cache = tmp_path / "readonly"
    cache.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MECHSCOPE_CACHE=str(cache))
    script = (f'mount -t tmpfs -o ro tmpfs "{cache}" && '
              f'exec "{sys.executable}" -m mechscope.cli demo --model "{gguf}" --device cpu')
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    expected = (f"error: cannot write the model cache at {cache / 'models'} (Read-only file system); "
                "set MECHSCOPE_CACHE to a writable folder")
    assert expected in " ".join(done.stderr.split())
