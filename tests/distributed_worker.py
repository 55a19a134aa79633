"""One rank of the two-process checks in test_distributed.py (run as a script, not collected by pytest).

    python distributed_worker.py SCENARIO MODEL_DIR OUT_DIR

`scenarios` computes attribution scores (EAP, EAP-IG, PEAP with two aggregations), faithfulness and one
patching sweep in the process group that torchrun's variables describe (set by the test), then a run
whose metric fails on rank 1 only. `sharded` computes the mean reference, exact scores on a subset of
edges (counterfactual and mean ablation), EAP and evaluate with mean ablation, and counts the example rows
each rank's model ran for the mean and for exact patching. `buffer` reads activations with the ActivationBuffer (each rank its
share of the sequences) and trains a dictionary from it. `train` joins a group initialised here from Python and takes a few
dictionary training steps on its half of each batch. Each rank saves what it got to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SCENARIO_EXAMPLES = 6  # 3 per rank, in batches of 2: uneven batches on each rank
TRAIN_STEPS = 3


def scenario_results(model, failing_on: int | None = None) -> dict:
    """Everything compared between one process and two; shared with the test's single-process run."""
    from mechscope import attribute, distributed
    from mechscope.circuits.circuit import top_n
    from mechscope.circuits.evaluation import evaluate, faithfulness_curve
    from mechscope.patching import patch_sweep
    from mechscope.tasks import make_task

    ds = make_task("ioi", model.tokenizer, SCENARIO_EXAMPLES, 0)
    out = {}
    runs = (("eap", "eap", {}), ("eap-ig", "eap-ig", {"steps": 3}), ("peap", "peap", {}),
            ("peap-avg", "peap", {"aggregation": "avg"}), ("peap-max", "peap", {"aggregation": "signed_max"}))
    for name, method, kw in runs:
        s = attribute(model, ds, method, batch_size=2, progress=False, **kw)
        out[name] = s.values
        for kind, part in s.crossing.items():
            out[f"{name}/{kind}"] = part
    scores = attribute(model, ds, "eap", batch_size=2, progress=False)
    f = evaluate(model, top_n(scores, 20), ds, batch_size=2, progress=False)
    out["evaluate"] = torch.tensor([f.soft, f.hard, f.normalized, f.metric_circuit, f.metric_model,
                                    f.metric_empty, f.gap_se], dtype=torch.float64)
    curve = faithfulness_curve(model, scores, ds, fractions=(0.05, 0.2, 1.0), batch_size=2, progress=False)
    out["curve"] = torch.tensor([[p.soft, p.normalized, p.hard] for p in curve.points], dtype=torch.float64)
    sweep = patch_sweep(model, ds, "z_pos", batch_size=2, progress=False)
    out["sweep"], out["sweep_raw"] = sweep.values, sweep.raw
    if failing_on is not None:
        from mechscope.errors import MechscopeError

        def metric(logits, batch):
            if distributed.rank() == failing_on:
                raise MechscopeError(f"metric failed on rank {failing_on} on purpose")
            return logits[:, 0] - logits[:, 1]

        try:
            attribute(model, ds, "eap", batch_size=2, progress=False, metric=metric)
            out["failure"] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the test
            out["failure"] = f"{type(e).__name__}: {e}"
    return out


MEAN_EXAMPLES = 5  # the reference set of the mean: shards of 2 and 3 examples


def sharded_results(model) -> tuple[dict, dict]:
    """(values compared between one process and two, {part: example rows this rank's model ran}): the
    mean reference over a 5-example reference set (uneven shards), exact scores on every 7th edge, EAP and
    evaluate with mean ablation; and the mean over a one-example set, which each rank reads whole."""
    from mechscope import attribute
    from mechscope.attribution.references import mean_reference
    from mechscope.circuits.circuit import top_n
    from mechscope.circuits.evaluation import evaluate
    from mechscope.graph import Graph
    from mechscope.tasks import make_task

    ds = make_task("ioi", model.tokenizer, SCENARIO_EXAMPLES, 0)
    ref = make_task("ioi", model.tokenizer, MEAN_EXAMPLES, 1)
    graph = Graph.from_model(model)
    rows = {"now": 0}

    def count(module, args, kwargs):
        rows["now"] += int(args[0].shape[0])

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    out = {}
    mean = mean_reference(model, graph, ref, batch_size=2, attention=True)
    rows["mean"], rows["now"] = rows["now"], 0
    out["mean/per_position"], out["mean/overall"] = mean.per_position, mean.overall
    for (layer, slot), m in sorted(mean.attention.items()):
        out[f"mean/attention/{layer}/{slot}"] = m.per_position
    out["mean/tokens"] = torch.tensor([float(ref.batch().attention_mask.sum())])  # the same on every rank
    one = mean_reference(model, graph, make_task("ioi", model.tokenizer, 1, 2), batch_size=2)  # fewer than ranks: whole
    out["mean-one/per_position"], out["mean-one/overall"] = one.per_position, one.overall
    edges = torch.arange(0, graph.n_edges, 7)
    for ablation in ("counterfactual", "mean"):
        rows["now"] = 0
        s = attribute(model, ds, "exact", edges=edges, ablation=ablation, reference=ref, batch_size=2, progress=False)
        rows[f"exact-{ablation}"] = rows["now"]
        out[f"exact-{ablation}"] = s.values[edges]
        out[f"exact-{ablation}/nan"] = s.values.isnan().double()
    handle.remove()
    scores = attribute(model, ds, "eap", ablation="mean", reference=ref, batch_size=2, progress=False)
    out["eap-mean"] = scores.values
    f = evaluate(model, top_n(scores, 20), ds, ablation="mean", reference=ref, batch_size=2, progress=False)
    out["evaluate-mean"] = torch.tensor([f.soft, f.hard, f.normalized, f.metric_circuit, f.metric_model,
                                         f.metric_empty], dtype=torch.float64)
    del rows["now"]
    return out, rows


def train_batches(seed: int = 0, rows: int = 10, d_in: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows + step, d_in, generator=g) * 2 + 0.5 for step in range(TRAIN_STEPS)]


def train_dictionary(batches, architecture: str = "relu"):
    from mechscope.dictionaries.dictionary import Dictionary, DictionaryConfig
    from mechscope.dictionaries.training import train

    kw = {"k": 4} if architecture == "topk" else {}
    config = DictionaryConfig(architecture=architecture, d_in=8, d_sae=16, hook_point="blocks.0.hook_resid_post", **kw)
    sae = Dictionary(config).init_weights(seed=1)
    train(sae, batches, TRAIN_STEPS, lr=1e-2, warmup_steps=0, log_every=1, progress=False)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


BUFFER_SEQUENCES, BUFFER_LENGTH, BUFFER_BATCH = 7, 6, 9


def buffer_tokens(model) -> torch.Tensor:
    """[7, 6] token ids, BOS first, the same on every rank."""
    from mechscope.lens.text import _bos_id

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, model.cfg.d_vocab, (BUFFER_SEQUENCES, BUFFER_LENGTH), generator=g)
    tokens[:, 0] = _bos_id(model.tokenizer)
    return tokens


def buffer_results(model) -> dict:
    """Which (sequence, position) rows this rank's buffer read, the sizes of its batches, and a
    dictionary trained for a few steps on its share of each batch (the buffer shards by itself)."""
    from mechscope.dictionaries import ActivationBuffer, Dictionary, DictionaryConfig
    from mechscope.dictionaries.training import train

    tokens = buffer_tokens(model)
    hook = "blocks.0.hook_resid_post"
    read = ActivationBuffer(model, hook, tokens, batch_size=BUFFER_BATCH, positions=True, progress=False)
    rows, sizes = [], []
    for x, where in read:
        rows.append(where)
        sizes.append(x.shape[0])
    config = DictionaryConfig(architecture="topk", d_in=model.cfg.d_model, d_sae=16, hook_point=hook, k=4)
    sae = Dictionary(config).init_weights(seed=1)
    initial = sae.W_enc.detach().clone()
    stream = ActivationBuffer(model, hook, tokens, batch_size=BUFFER_BATCH, loop=True, drop_last=True, progress=False)
    train(sae, stream, TRAIN_STEPS, lr=1e-2, warmup_steps=0, progress=False)
    return {"rows": torch.cat(rows), "sizes": sizes, "sequences": stream.sequences, "initial": initial,
            "params": {k: v.detach().clone() for k, v in sae.state_dict().items()}}


def main() -> None:
    scenario, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    import torch.distributed as dist

    from mechscope import distributed

    if scenario == "scenarios":  # torchrun-style: the library sets the group up from the environment
        import mechscope

        model = mechscope.load_model(model_dir, device="cpu")
        result = scenario_results(model, failing_on=1)
    elif scenario == "sharded":  # torchrun-style group: the mean reference and exact patching
        import mechscope

        values, rows = sharded_results(mechscope.load_model(model_dir, device="cpu"))
        result = {"values": values, "rows": rows}
    elif scenario == "buffer":  # torchrun-style group; the activation buffer shards the sequences
        import mechscope

        result = buffer_results(mechscope.load_model(model_dir, device="cpu"))
    elif scenario == "train":  # a group the caller initialised itself (no torchrun variables)
        import os

        rank, world = int(os.environ.pop("RANK")), int(os.environ.pop("WORLD_SIZE"))
        address = f"tcp://{os.environ.pop('MASTER_ADDR')}:{os.environ.pop('MASTER_PORT')}"
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
        result = {}
        for arch in ("relu", "topk"):
            mine = [b[distributed.shard(len(b))] for b in train_batches()]
            result[arch] = train_dictionary(mine, arch)
        try:  # rank 1's first batch is empty: both ranks stop with its error
            batches = train_batches()
            mine = [b[:0] if distributed.rank() == 1 else b for b in batches]
            train_dictionary(mine)
            result["failure"] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the test
            result["failure"] = f"{type(e).__name__}: {e}"
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    torch.save(result, out_dir / f"rank{distributed.rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
