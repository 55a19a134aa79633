"""Every dictionary architecture on SmolLM2 at a matched L0, on the same tokens: the README's table.

Run (from the repository root; about 75 minutes at one thread on this 2-core CPU):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/table_dictionaries.py [--tokens 195072]
        [--l0 32] [--text FILE] [--held-out 64] [--device cpu] [--out runs/dictionary-table]

What it does:
  * token stream (unless --text): this Python's documentation, the pydoc topics (as benchmarks/bench_sae.py)
    followed by the standard library's docstrings (python_docs()), in sequences of 128 tokens with BOS
    first; the last --held-out sequences are kept out of training.
  * activations are read once per set of hook points (ActivationBuffer, one shuffled pass) and held in
    memory, so every architecture trains on the same batches in the same order:
      SAEs: blocks.15.hook_resid_post; transcoders: blocks.15.hook_mlp_in -> blocks.15.hook_mlp_out;
      crosscoder: blocks.14/15/16.hook_resid_post.
  * every dictionary has 4,608 latents (8 x 576) and trains for one pass (1,016 positions a step) with lr 2e-3,
    1e-3 for relu, gated and jumprelu (relu from unit-norm decoder rows).
  * matched L0: topk, batchtopk, matryoshka and the transcoders (TopK activation) use k = --l0 directly
    (BatchTopK's inference threshold: the mean smallest kept activation over the last tenth of the steps).
    relu, gated and jumprelu have no k: they train with train(..., target_l0=--l0), whose controller
    adapts the sparsity coefficient to the batches' L0 as training goes (JumpReLU's thresholds start at
    each latent's quantile for that density on the first batch). Their held-out L0 is therefore near,
    not exactly, the target; the table prints the value and the final coefficient.
  * dead latents feed AuxK after --dead-after tokens without firing (default: an eighth of the run).
  * measured on the held-out sequences by dictionaries.measure: FVU, L0, dead latents (never firing on the
    held-out tokens), CE loss recovered against zero and mean ablation, KL. The crosscoder is spliced
    acausally: its reconstruction of all three layers, computed from the clean run, replaces each of them.
  * time: seconds to train from the held activations (the model's forward passes, shared by all, are
    timed once per hook set and printed separately).
Prints one key=value line per architecture and a Markdown table at the end; writes summary.json under --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SEQ_LEN, EXPANSION, LR = 128, 8, 2e-3
RESID = "blocks.15.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.15.hook_mlp_in", "blocks.15.hook_mlp_out"
STACK = ("blocks.14.hook_resid_post", "blocks.15.hook_resid_post", "blocks.16.hook_resid_post")
START = {"relu": 15.0, "gated": 20.0, "jumprelu": 0.01}  # starting coefficients (target_l0 adapts them)
PENALTY_LR = 1e-3  # relu, gated, jumprelu: 2e-3 overshoots their L0 early


NOT_IMPORTED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc", "webbrowser",
                "lib2to3", "ensurepip", "venv", "test"}  # side effects on import, or no prose


def python_docs() -> str:
    """This Python's documentation as one text: the pydoc topics, then each standard-library module's
    docstring and the longer (> 200 characters) docstrings of its public classes and functions."""
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in NOT_IMPORTED:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # modules of other platforms, or missing optional parts
            continue
        if inspect.getdoc(module):
            parts.append(inspect.getdoc(module))
        for attr in sorted(getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]):
            obj = getattr(module, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


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


def fit(sae, batches, steps, target_l0=None, dead_after=1_000_000):
    from mechscope.dictionaries import train

    start = time.perf_counter()
    lr = LR if target_l0 is None else PENALTY_LR
    result = train(sae, iter(batches[:steps]), steps, lr=lr, progress=False, target_l0=target_l0,
                   dead_after=dead_after)
    return result, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=195072, help="training positions per architecture")
    ap.add_argument("--dead-after", type=int, default=0, help="tokens without firing before a latent counts as "
                    "dead and feeds AuxK (0: an eighth of --tokens)")
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
    from mechscope.fileio import write_json
    from mechscope.lens.text import model_fingerprint
    from mechscope.models import load_model

    torch.manual_seed(args.seed)
    bridge = load_model(args.model, device=args.device)
    if args.text is None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.text = args.out / "python_docs.txt"
        args.text.write_text(python_docs(), encoding="utf-8")
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
        penalty = arch in START
        field = {"jumprelu": "l0_coefficient"}.get(arch, "l1_coefficient")
        sae = make(arch, d_in, *ident, args.l0, args.seed, **({field: START[arch]} if penalty else {}))
        if arch == "relu":  # unit decoder rows to start (the 0.1 default suits far smaller learning rates)
            sae.init_weights(args.seed, decoder_norm=1.0)
        result, secs = fit(sae, train_b, steps, target_l0=float(args.l0) if penalty else None,
                           dead_after=args.dead_after or max(batch, steps * batch // 8))
        row = {"architecture": arch, "tokens": result.tokens, "train_seconds": round(secs, 1)}
        if penalty:
            row[field] = getattr(sae.config, field)
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
        ce = f"{r['ce_zero']:.3f} / {r['ce_mean']:.3f}"
        print(f"| {r['architecture']} | {hook} | {r['l0']:.1f} | {r['fvu']:.3f} | {ce} | {r['dead']} "
              f"| {r['tokens']} | {r['train_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
