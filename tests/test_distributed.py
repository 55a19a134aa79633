"""Data-parallel runs (distributed.py): two CPU processes with gloo against one process.

Each check launches tests/distributed_worker.py twice (rank 0 and 1) with a free port, the same tiny model
directory and the same seeds, and compares what the ranks computed with this process's own run, which has
no process group (the single-process path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from mechscope import distributed

HERE = Path(__file__).parent
REL = 1e-5
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, model_dir, out: Path, world: int = 2) -> list[dict]:
    """Run `world` ranks of the worker; fail (not hang) if they do not all finish in TIMEOUT_S."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), scenario,
                                       str(model_dir), str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {world} ranks of '{scenario}' did not finish in {TIMEOUT_S} s (a hang)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.double(), want.double()
    assert got.shape == want.shape, name
    scale = want.abs().max().clamp(min=1e-12)
    err = float((got - want).abs().max() / scale)
    assert err <= REL, f"{name}: max difference {err:.2e} of the largest value (limit {REL})"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return tiny.save_model_dir(tmp_path_factory.mktemp("dist_model") / "llama", "llama", tiny_tokenizer, seed=3)


def test_single_process_path_has_no_group():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    t = torch.ones(3, device="cpu")
    assert distributed.all_reduce_sum(t) is t  # no copy, no collective


def test_shards_cover_every_example_once():
    for n in (1, 2, 7, 64):
        for world in (1, 2, 3, 5):
            for how in distributed.SHARDING:
                parts = [distributed.shard(n, how, r, world) for r in range(world)]
                assert sorted(i for p in parts for i in p) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.shard(7, "contiguous", 1, 2) == [3, 4, 5, 6]
    assert distributed.shard(7, "strided", 1, 2) == [1, 3, 5]


def test_two_ranks_equal_one_process(model_dir, tmp_path):
    """EAP, EAP-IG and PEAP (sum, avg and signed_max aggregation) scores, evaluate, a faithfulness curve
    and a patching sweep: both ranks hold the one-process values; a metric that fails on rank 1 only
    stops both ranks with rank 1's message."""
    import mechscope
    from distributed_worker import scenario_results

    ranks = launch("scenarios", model_dir, tmp_path)
    want = scenario_results(mechscope.load_model(str(model_dir), device="cpu"))
    assert {k for k in ranks[0] if k != "failure"} == set(want)
    for rank, got in enumerate(ranks):
        for key, value in want.items():
            assert_close(f"rank {rank} {key}", got[key], value)
    assert ranks[1]["failure"] == "MechscopeError: metric failed on rank 1 on purpose"
    assert ranks[0]["failure"] == "RankFailed: rank 1 of 2 failed: MechscopeError: metric failed on rank 1 on purpose"


def test_two_rank_training_step_equals_one_process_on_the_whole_batch(tmp_path):
    """Each rank trains on its half of every batch (a process group initialised by the caller): the
    parameters after three steps equal one process's on the whole batches (relu and topk with AuxK off)."""
    from distributed_worker import train_batches, train_dictionary

    ranks = launch("train", "-", tmp_path)
    for arch in ("relu", "topk"):
        want = train_dictionary(train_batches(), arch)
        changed = train_dictionary([b[:5] for b in train_batches()], arch)
        for rank, got in enumerate(ranks):
            for name, value in want.items():
                assert_close(f"rank {rank} {arch} {name}", got[arch][name], value)
        # the check can fail: half the batch alone trains to other parameters
        assert any(not torch.allclose(changed[n], want[n], rtol=REL, atol=0) for n in want)
    assert "batch 0 has no tokens" in ranks[1]["failure"]
    assert ranks[0]["failure"].startswith("RankFailed: rank 1 of 2 failed: DictionaryError: batch 0 has no tokens")


def test_torchrun_circuit_writes_once_on_rank_0(model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m mechscope circuit ...`: both ranks succeed, the report is written
    once (rank 0), nothing else is left beside it, and rank 1 prints no results table."""
    out = tmp_path / "run" / "report"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--tee", "3", "-m", "mechscope", "circuit", "--task", "ioi", "--model", str(model_dir),
           "--examples", "8", "--method", "eap", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["report"]
    assert {"report.html", "summary.json", "scores.safetensors", "circuit.json"} <= {p.name for p in out.iterdir()}
    assert log.count("held-out faithfulness") == 1, log[-3000:]  # the table title, from rank 0 only
