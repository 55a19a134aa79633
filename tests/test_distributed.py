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


def test_alone_runs_one_rank_as_the_only_process(monkeypatch):
    """Under torchrun (its variables set), `alone()` is how rank 0 runs a command that is not data-parallel:
    no group is set up, rank 0 of 1, no sharding; after the block the process is one rank again."""
    for name, value in zip(distributed.TORCHRUN_VARS, ("0", "2", "0", "127.0.0.1", "1")):
        monkeypatch.setenv(name, value)
    assert distributed.active()
    with distributed.alone():
        assert not distributed.active() and not distributed.initialised()
        assert (distributed.rank(), distributed.world_size(), distributed.shard(5)) == (0, 1, [0, 1, 2, 3, 4])
        assert distributed.progress_enabled(True)
    assert distributed.active() and not distributed.initialised()


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


def test_two_ranks_shard_exact_and_mean_reference(model_dir, tmp_path):
    """The mean reference (uneven shards of a 5-example reference set, with q/k/v means; a one-example
    set read whole on each rank), exact scores on a subset of edges (NaN elsewhere) with the
    counterfactual and the mean reference, EAP and evaluate with mean ablation: both ranks hold the
    one-process values, and each rank's model ran only its shard of the examples (the ranks' rows add
    up to one process's)."""
    import mechscope
    from distributed_worker import sharded_results

    ranks = launch("sharded", model_dir, tmp_path)
    want, rows = sharded_results(mechscope.load_model(str(model_dir), device="cpu"))
    for rank, got in enumerate(ranks):
        assert set(got["values"]) == set(want)
        for key, value in want.items():
            assert_close(f"rank {rank} {key}", got["values"][key], value)
    assert ranks[0]["rows"].keys() == rows.keys()
    for part, total in rows.items():
        assert sum(r["rows"][part] for r in ranks) == total, part
        assert all(0 < r["rows"][part] < total for r in ranks), part


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


def test_two_rank_activation_buffer_reads_each_sequence_once_and_ranks_agree(model_dir, tmp_path):
    """The ActivationBuffer shards by itself in a process group: each rank reads the sequences i with
    i % 2 == rank, every kept position once across the ranks, batches of its part of batch_size; a
    dictionary trained from it holds bit-identical parameters on both ranks, and not the initial ones."""
    import mechscope
    from distributed_worker import BUFFER_BATCH, buffer_tokens
    from mechscope.dictionaries.activations import _keep_mask

    ranks = launch("buffer", model_dir, tmp_path)
    model = mechscope.load_model(str(model_dir), device="cpu")
    keep, _, _ = _keep_mask(buffer_tokens(model), None, model.tokenizer)
    rows = [tuple(r) for rank in ranks for r in rank["rows"].tolist()]
    assert sorted(rows) == sorted(map(tuple, keep.nonzero().tolist()))  # each kept position exactly once
    for rank, got in enumerate(ranks):
        assert {s for s, _ in got["rows"].tolist()} == set(range(rank, len(keep), 2))
        assert got["sequences"].tolist() == list(range(rank, len(keep), 2))
        assert set(got["sizes"][:-1]) == {len(distributed.shard(BUFFER_BATCH, rank_=rank, world=2))}
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name
    assert not torch.equal(ranks[0]["params"]["W_enc"], ranks[0]["initial"])  # it trained


def torchrun(args: list[str]) -> str:
    """`torchrun --standalone --nproc-per-node 2 -m mechscope ARGS` on the CPU; its log (both ranks, tagged)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--tee", "3",
           "-m", "mechscope", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return log


def said_by(log: str, rank: int) -> list[str]:
    """The lines with content that rank `rank` printed (torchrun's --tee tags them [default{rank}]:)."""
    tag = f"[default{rank}]:"
    return [line for line in log.splitlines() if line.startswith(tag) and line[len(tag):].strip()]


def test_torchrun_sae_train_writes_once_on_rank_0(model_dir, tmp_path):
    """`torchrun -m mechscope sae train`: rank 0 samples the text and hands it over, each rank trains on
    its share of the sequences, rank 0 alone writes the dictionary directory (no checkpoint or temporary
    left) and prints its summary line."""
    out = tmp_path / "run" / "sae"
    out.parent.mkdir()
    log = torchrun(["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post",
                    "--architecture", "topk", "--k", "4", "--expansion", "2", "--tokens", "120", "--held-out", "2", "--length", "8", "--batch-size", "20", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["sae"]
    assert {"config.json", "dictionary.safetensors", "metrics.json", "training.json", "report"} <= \
        {p.name for p in out.iterdir()}
    assert log.count(f"wrote {out}") == 1, log[-3000:]
    assert said_by(log, 0) and not said_by(log, 1), log[-3000:]  # no results, notes or progress from rank 1


def test_torchrun_command_that_is_not_data_parallel_runs_on_rank_0_alone(model_dir, tmp_path):
    """`mechscope data` has nothing to shard: rank 0 builds and writes the dataset by itself (with its
    own progress, no collectives), rank 1 does nothing; the file is written and announced once."""
    out = tmp_path / "run" / "ioi.jsonl"
    out.parent.mkdir()
    log = torchrun(["data", "ioi", "--model", str(model_dir), "--out", str(out)])
    assert [p.name for p in out.parent.iterdir()] == ["ioi.jsonl"]
    assert log.count("examples to") == 1, log[-3000:]
    assert said_by(log, 0) and not said_by(log, 1), log[-3000:]


def test_torchrun_attribute_equals_one_process(model_dir, tmp_path):
    """`torchrun -m mechscope attribute`: two ranks each score half the examples; rank 0 writes the
    all-reduced scores, equal to one process's, and nothing else is left beside them."""
    from mechscope.attribution.scores import EdgeScores

    one, two = tmp_path / "one" / "scores.safetensors", tmp_path / "two" / "scores.safetensors"
    one.parent.mkdir()
    two.parent.mkdir()
    args = ["attribute", "--task", "ioi", "--model", str(model_dir), "--examples", "6", "--method", "peap"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "mechscope", *args, "--out", str(one)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    log = torchrun([*args, "--out", str(two)])
    assert [p.name for p in two.parent.iterdir()] == ["scores.safetensors"]
    assert log.count("wrote") == 1, log[-3000:]
    a, b = EdgeScores.load(one), EdgeScores.load(two)
    assert a.n_examples == b.n_examples == 6 and a.spans == b.spans
    assert torch.allclose(a.values, b.values, rtol=1e-5, atol=1e-7)
    assert a.crossing.keys() == b.crossing.keys()
    for name, value in a.crossing.items():
        assert torch.allclose(value, b.crossing[name], rtol=1e-5, atol=1e-7), name
