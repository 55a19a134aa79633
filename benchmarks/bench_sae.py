"""TopK SAE (k = 32, 8x width) on SmolLM2's blocks.15.hook_resid_post: mechscope against EleutherAI's sparsify.

Setup, once (sparsify gets its own venv so mechscope's stays clean; the folder is git-ignored):
    python3 -m venv benchmarks/.venv-sparsify && benchmarks/.venv-sparsify/bin/pip install torch==2.13.0 && benchmarks/.venv-sparsify/bin/pip install eai-sparsify

Run (from the repository root):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_sae.py [--tokens 65024] [--lr 2e-3] [--text FILE]
        [--held-out 64] [--device cpu] [--workdir DIR] [--sparsify-python benchmarks/.venv-sparsify/bin/python]

The token stream is built once (mechscope.dictionaries.training_tokens over --text; default: the Python
documentation's topics from pydoc_data, written to a file), cut into sequences of 128 tokens (BOS first),
and saved; both trainers read the same sequences in the same number: mechscope through ActivationBuffer +
dictionaries.train, sparsify (run as a subprocess in its venv, given the token file) through its Trainer
on a `datasets` Dataset of the same ids, with the BOS id excluded so both train on the same positions.
Batches: 8 sequences x 127 positions per step for both (sparsify counts in sequences, mechscope in
positions). Throughput counts from the first activation read to the end of training (model loading
excluded). Both trained SAEs are then measured by the same code (dictionaries.measure) on held-out
sequences that neither trained on: FVU, L0, latents that never fire there, CE loss recovered.
The default --tokens 65024 (64 steps) is sized to finish well under 20 minutes on 2 cores (sparsify
at ~140 tokens/s under load is ~8 minutes of it). Prints key=value lines and ends with `ratio=<mechscope tokens/s / sparsify tokens/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "blocks.15.hook_resid_post"
SPARSIFY_HOOK = "layers.15"  # the output of decoder layer 15 of the HF model = the same residual stream
K, EXPANSION, SEQ_PER_STEP, LENGTH = 32, 8, 8, 128
HERE = Path(__file__).resolve().parent


def _default_text(workdir: Path) -> Path:
    from pydoc_data.topics import topics

    path = workdir / "pydoc_topics.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The sparsify half (runs in benchmarks/.venv-sparsify; imports nothing from mechscope)
# ------------------------------------------------------------------------------------------------


def sparsify_worker(args) -> int:
    import torch
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer, TrainConfig
    from transformers import AutoModelForCausalLM

    saved = torch.load(args.tokens_file, weights_only=True)
    tokens, bos = saved["tokens"], int(saved["bos"])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device)
    model.eval()
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(SaeConfig(k=K, expansion_factor=EXPANSION), batch_size=SEQ_PER_STEP,
                      hookpoints=[SPARSIFY_HOOK], exclude_tokens=[bos], init_seeds=[args.seed],
                      log_to_wandb=False, save_every=10**9, save_dir=str(args.out), run_name="run")
    trainer = Trainer(cfg, dataset, model)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    steps = len(dataset) // SEQ_PER_STEP
    positions = int((tokens[: steps * SEQ_PER_STEP] != bos).sum())
    result = {"seconds": seconds, "tokens": positions, "steps": steps,
              "sae_dir": str(Path(args.out) / "run" / SPARSIFY_HOOK), "torch_threads": torch.get_num_threads()}
    Path(args.result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# The benchmark (mechscope's environment)
# ------------------------------------------------------------------------------------------------


def _print_metrics(name: str, m, tokens_per_s: float) -> None:
    print(f"{name}_tokens_per_s={tokens_per_s:.1f}")
    print(f"{name}_fvu={m.fvu:.4f}")
    print(f"{name}_l0={m.l0:.2f}")
    print(f"{name}_dead={m.dead} ({m.dead_fraction:.3f} of {m.d_sae} never fire on {m.predictions} held-out tokens)")
    print(f"{name}_ce_recovered_zero={m.ce_recovered_zero:.4f}")
    print(f"{name}_ce_recovered_mean={m.ce_recovered_mean:.4f}")
    print(f"{name}_kl={m.kl:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65024,
                    help="training positions (BOS excluded) for each trainer; rounded down to whole steps of "
                         f"{SEQ_PER_STEP} x {LENGTH - 1}")
    ap.add_argument("--text", type=Path, default=None, help="training text (.txt, .jsonl, datasets dir); "
                    "default: the Python docs' topics from pydoc_data")
    ap.add_argument("--held-out", type=int, default=64, help="held-out sequences the metrics are measured on")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=2e-3, help="mechscope's Adam learning rate (sparsify: its defaults)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the token file and sparsify's SAE go "
                    "(default: a temporary directory, removed at the end)")
    ap.add_argument("--sparsify-python", type=Path, default=HERE / ".venv-sparsify" / "bin" / "python")
    # the sparsify half, run as a subprocess
    ap.add_argument("--sparsify-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sparsify_worker:
        return sparsify_worker(args)
    if not args.sparsify_python.exists():
        sys.exit(f"{args.sparsify_python}: no sparsify venv; create it with the setup line at the top of this script")
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
            return run(args, Path(tmp))
    args.workdir.mkdir(parents=True, exist_ok=True)
    return run(args, args.workdir)


def run(args, workdir: Path) -> int:
    import torch

    from mechscope.devices import synchronize
    from mechscope.dictionaries import ActivationBuffer, Dictionary, DictionaryConfig, load_sparsify, measure, train, \
        training_tokens
    from mechscope.dictionaries.activations import _bos_id, hook_widths
    from mechscope.lens.text import model_fingerprint
    from mechscope.models import load_model, resolve_spec

    per_seq = LENGTH - 1
    steps = args.tokens // (SEQ_PER_STEP * per_seq)
    if steps < 1:
        sys.exit(f"--tokens must be at least {SEQ_PER_STEP * per_seq} (one step of {SEQ_PER_STEP} x {per_seq})")
    n_train = steps * SEQ_PER_STEP
    text = args.text or _default_text(workdir)
    bridge = load_model(args.model, device=args.device)
    bos = _bos_id(bridge.tokenizer)
    tokens = training_tokens(bridge, text=text, length=LENGTH)
    if tokens.shape[0] < n_train + args.held_out:
        sys.exit(f"{text}: {tokens.shape[0]} sequences of {LENGTH} tokens; {n_train} to train on and {args.held_out} "
                 "held out need more text (or fewer --tokens)")
    train_tokens, held = tokens[:n_train], tokens[-args.held_out:]
    positions = int((train_tokens != bos).sum())
    tokens_file = workdir / "tokens.pt"
    torch.save({"tokens": train_tokens.clone(), "bos": bos}, tokens_file)
    print(f"model={args.model} hook={HOOK} k={K} d_sae={EXPANSION}x device={args.device} "
          f"threads={torch.get_num_threads()}")
    print(f"text={text} sequences={n_train}x{LENGTH} tokens={positions} steps={steps} "
          f"batch={SEQ_PER_STEP}x{per_seq} held_out={args.held_out}x{LENGTH}")
    sys.stdout.flush()

    # -- mechscope ---------------------------------------------------------------------------------
    d_in = hook_widths(bridge, [HOOK])[HOOK]
    config = DictionaryConfig("topk", d_in, EXPANSION * d_in, HOOK, k=K, model_name=args.model,
                              model_fingerprint=model_fingerprint(bridge))
    sae = Dictionary(config, device=args.device).init_weights(args.seed)
    synchronize(args.device)
    start = time.perf_counter()
    # loop=False: the training sequences are read once, as sparsify reads them (a looping buffer would
    # read ahead past the last step, up to its capacity, and count forward passes never trained on)
    buffer = ActivationBuffer(bridge, HOOK, train_tokens, batch_size=SEQ_PER_STEP * per_seq, seed=args.seed,
                              loop=False, drop_last=True, progress=False)
    result = train(sae, buffer, steps, lr=args.lr, progress=True)
    synchronize(args.device)
    ms_seconds = time.perf_counter() - start
    if result.tokens != positions:
        print(f"warning: mechscope trained on {result.tokens} positions, not {positions}", file=sys.stderr)
    ms_rate = result.tokens / ms_seconds
    ms_metrics = measure(bridge, sae, held)

    # -- sparsify (subprocess in its own venv) -------------------------------------------------------
    _, model_dir = resolve_spec(args.model)
    result_file = workdir / "sparsify_result.json"
    cmd = [str(args.sparsify_python), str(Path(__file__).resolve()), "--sparsify-worker",
           "--tokens-file", str(tokens_file), "--model-dir", str(model_dir), "--out", str(workdir / "sparsify"),
           "--result", str(result_file), "--device", args.device, "--seed", str(args.seed)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("WANDB_MODE", "disabled")
    done = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if done.returncode != 0:
        sys.exit(f"the sparsify half failed (exit {done.returncode}); its output is above")
    sp = json.loads(result_file.read_text())
    if sp["tokens"] != positions:
        print(f"warning: sparsify trained on {sp['tokens']} positions, not {positions}", file=sys.stderr)
    sp_rate = sp["tokens"] / sp["seconds"]
    sp_sae = load_sparsify(sp["sae_dir"], hook_point=HOOK, device=args.device)
    sp_metrics = measure(bridge, sp_sae, held)

    print(f"mechscope_seconds={ms_seconds:.1f} mechscope_tokens={result.tokens}")
    _print_metrics("mechscope", ms_metrics, ms_rate)
    print(f"sparsify_seconds={sp['seconds']:.1f} sparsify_tokens={sp['tokens']} sparsify_threads={sp['torch_threads']}")
    _print_metrics("sparsify", sp_metrics, sp_rate)
    print(f"fvu_gap={ms_metrics.fvu - sp_metrics.fvu:+.4f} (mechscope - sparsify; target <= +0.01)")
    print(f"ratio={ms_rate / sp_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
