"""Every dictionary architecture on SmolLM2 at a matched L0, on the same tokens: the README's table.

Run (from the repository root; ~20-30 minutes on 2 CPU cores):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/table_dictionaries.py [--tokens 65024]
        [--l0 32] [--text FILE] [--held-out 64] [--device cpu] [--out runs/dictionary-table]

What it does:
  * token stream: as benchmarks/bench_sae.py (the Python docs' topics from pydoc_data unless --text),
    sequences of 128 tokens with BOS first; the last --held-out sequences are kept out of training.
  * activations are read once per set of hook points (ActivationBuffer, one shuffled pass) and held in
    memory, so every architecture trains on the same batches in the same order:
      SAEs: blocks.15.hook_resid_post; transcoders: blocks.15.hook_mlp_in -> blocks.15.hook_mlp_out;
      crosscoder: blocks.14/15/16.hook_resid_post.
  * every dictionary has 4,608 latents (8 x 576) and trains with lr 2e-3 for one pass (1,016 positions a step).
  * matched L0: topk, batchtopk, matryoshka and the transcoders (TopK activation) use k = --l0 directly.
    relu, gated and jumprelu have no k: their sparsity coefficient is found by a log-scale bisection on
    quarter-length runs until the held-out L0 is within 15% of --l0 (at most 6 tries each), then trained
    on the full stream. Their L0 is therefore near, not exactly, the target; the table prints the value.
  * measured on the held-out sequences by dictionaries.measure: FVU, L0, dead latents (never firing on the
    held-out tokens), CE loss recovered against zero and mean ablation, KL. A crosscoder reads and writes
    three layers at once and cannot be spliced into one causal pass, so it gets FVU / L0 / dead from
    dictionaries.evaluate on held-out activations and no CE.
  * time: seconds to train from the held activations (the model's forward passes, shared by all, are
    timed once per hook set and printed separately).
Prints one key=value line per architecture and a Markdown table at the end; writes summary.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

SEQ_LEN, EXPANSION, LR = 128, 8, 2e-3
RESID = "blocks.15.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.15.hook_mlp_in", "blocks.15.hook_mlp_out"
STACK = ("blocks.14.hook_resid_post", "blocks.15.hook_resid_post", "blocks.16.hook_resid_post")
COEFFICIENT = {"relu": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}
START = {"relu": 5.0, "gated": 5.0, "jumprelu": 1.0}


def harvest(bridge, points, tokens, batch, seed, target=None):
    """The batches of one shuffled pass over `tokens` at `points`, held in memory, and the seconds it took."""
    import torch

    from mechscope.dictionaries import ActivationBuffer

    start = time.perf_counter()
    buffer = ActivationBuffer(bridge, points, tokens, target=target, batch_size=batch, seed=seed, loop=False,
                              drop_last=True, progress=False)
    batches = [b if isinstance(b, torch.Tensor) else tuple(b) for b in buffer]
    return batches, time.perf_counter() - start


def make(arch, d_in, model_name, fingerprint, k, seed, **extra):
    from mechscope.dictionaries import Dictionary, DictionaryConfig

    fields = dict(model_name=model_name, model_fingerprint=fingerprint)
    if arch in ("topk", "batchtopk"):
        fields.update(k=k)
    elif arch == "matryoshka":
        d = EXPANSION * d_in
        fields.update(k=k, activation="batchtopk", prefixes=(d // 16, d // 4, d))
    elif arch in ("transcoder", "skip_transcoder"):
        fields.update(k=k, activation="topk", out_hook_point=MLP_OUT, d_out=d_in)
    elif arch == "crosscoder":
        fields.update(k=k, activation="topk", hook_points=STACK)
    fields.update(extra)
    hook = MLP_IN if arch in ("transcoder", "skip_transcoder") else ("" if arch == "crosscoder" else RESID)
    config = DictionaryConfig(arch, d_in, EXPANSION * d_in, hook, **fields)
    return Dictionary(config).init_weights(seed)


def fit(sae, batches, steps):
    from mechscope.dictionaries import train

    start = time.perf_counter()
    result = train(sae, iter(batches[:steps]), steps, lr=LR, progress=False)
    return result, time.perf_counter() - start


def held_l0(sae, held_batches) -> float:
    from mechscope.dictionaries.metrics import evaluate

    return float(evaluate(sae, iter(held_batches)).l0())


def calibrate(arch, d_in, ident, k, seed, batches, held_batches, target):
    """The sparsity coefficient giving a held-out L0 within 15% of `target` on quarter-length runs."""
    name = COEFFICIENT[arch]
    low, high, value = None, None, START[arch]
    steps = max(len(batches) // 4, 8)
    tried = []
    for _ in range(6):
        sae = make(arch, d_in, *ident, k, seed, **{name: value})
        fit(sae, batches, steps)
        got = held_l0(sae, held_batches)
        tried.append((value, got))
        print(f"  calibrate {arch} {name}={value:.4g}: held-out L0 {got:.1f}", flush=True)
        if abs(got - target) <= 0.15 * target:
            break
        if got > target:   # too dense: a larger coefficient
            low = value
            value = value * 4 if high is None else math.sqrt(value * high)
        else:
            high = value
            value = value / 4 if low is None else math.sqrt(value * low)
    best = min(tried, key=lambda t: abs(math.log(max(t[1], 1e-3) / target)))
    return name, best[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65024, help="training positions per architecture")
    ap.add_argument("--l0", type=int, default=32, help="the L0 every architecture is matched to")
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated architectures (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/dictionary-table"))
    args = ap.parse_args()

    import torch

    from mechscope.dictionaries import ARCHITECTURES, measure, training_tokens
    from mechscope.dictionaries.activations import hook_widths
    from mechscope.dictionaries.metrics import evaluate
    from mechscope.fileio import write_json
    from mechscope.lens.text import model_fingerprint
    from mechscope.models import load_model

    torch.manual_seed(args.seed)
    bridge = load_model(args.model, device=args.device)
    if args.text is None:
        from pydoc_data.topics import topics

        args.out.mkdir(parents=True, exist_ok=True)
        args.text = args.out / "pydoc_topics.txt"
        args.text.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    per_seq = SEQ_LEN - 1
    batch = 8 * per_seq
    steps = args.tokens // batch
    tokens = training_tokens(bridge, text=args.text, length=SEQ_LEN)
    need = steps * 8 + args.held_out
    if tokens.shape[0] < need:
        sys.exit(f"{args.text}: {tokens.shape[0]} sequences; {need} needed")
    train_tokens, held = tokens[:steps * 8], tokens[-args.held_out:]
    d_in = hook_widths(bridge, [RESID])[RESID]
    ident = (args.model, model_fingerprint(bridge))
    archs = [a for a in ARCHITECTURES if not args.only or a in args.only.split(",")]
    print(f"model={args.model} tokens={steps * batch} steps={steps} held_out={args.held_out}x{SEQ_LEN} "
          f"d_sae={EXPANSION * d_in} target_l0={args.l0} threads={torch.get_num_threads()}", flush=True)

    sets = {}
    for name, points, target in (("resid", RESID, None), ("mlp", MLP_IN, MLP_OUT), ("stack", list(STACK), None)):
        if name == "mlp" and not {"transcoder", "skip_transcoder"} & set(archs):
            continue
        if name == "stack" and "crosscoder" not in archs:
            continue
        train_b, secs = harvest(bridge, points, train_tokens, batch, args.seed, target)
        held_b, _ = harvest(bridge, points, held, batch, args.seed, target)
        sets[name] = (train_b, held_b)
        print(f"harvest_{name}_seconds={secs:.1f} batches={len(train_b)}", flush=True)

    rows = []
    for arch in archs:
        kind = "mlp" if arch in ("transcoder", "skip_transcoder") else ("stack" if arch == "crosscoder" else "resid")
        train_b, held_b = sets[kind]
        extra = {}
        if arch in COEFFICIENT:
            name, value = calibrate(arch, d_in, ident, args.l0, args.seed, train_b, held_b, args.l0)
            extra = {name: value}
        sae = make(arch, d_in, *ident, args.l0, args.seed, **extra)
        result, secs = fit(sae, train_b, steps)
        row = {"architecture": arch, "tokens": result.tokens, "train_seconds": round(secs, 1), **extra}
        if arch == "crosscoder":
            stats = evaluate(sae, iter(held_b))
            row.update(fvu=stats.fvu(), l0=stats.l0(), dead=int(stats.dead().sum()), ce_zero=None, ce_mean=None,
                       kl=None)
        else:
            m = measure(bridge, sae, held)
            row.update(fvu=m.fvu, l0=m.l0, dead=m.dead, ce_zero=m.ce_recovered_zero, ce_mean=m.ce_recovered_mean,
                       kl=m.kl)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    write_json(args.out / "summary.json", {"model": args.model, "target_l0": args.l0, "rows": rows})
    print("\n| architecture | hook | L0 | FVU | CE recovered (zero / mean) | dead latents | tokens | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        hook = {"transcoder": "mlp_in -> mlp_out", "skip_transcoder": "mlp_in -> mlp_out",
                "crosscoder": "resid_post 14-16"}.get(r["architecture"], "resid_post 15")
        ce = "n/a (acausal)" if r["ce_zero"] is None else f"{r['ce_zero']:.3f} / {r['ce_mean']:.3f}"
        print(f"| {r['architecture']} | {hook} | {r['l0']:.1f} | {r['fvu']:.3f} | {ce} | {r['dead']} "
              f"| {r['tokens']} | {r['train_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
