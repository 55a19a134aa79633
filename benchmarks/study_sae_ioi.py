"""A feature circuit for IOI on SmolLM2-135M: a TopK SAE spliced at one residual-stream point, EAP over its
latents and error per schema span, and the faithfulness curve of the top-n (span, latent) nodes.

Run (from the repository root; about 25-40 minutes on 2 loaded CPU cores):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/study_sae_ioi.py [--tokens 32512]
        [--examples 32] [--ns 0,1,4,16,64,256,1024] [--hook blocks.22.hook_resid_post]
        [--out runs/sae-ioi] [--figure docs/images/sae-ioi-curve.png]

Hook point. SmolLM2-135M has 30 layers. A quick look (runs once by hand, 16 IOI pairs, patching the
counterfactual's resid_post into the clean run either at the three name positions or at the last
position, normalised so 1 = no effect) gave, by layer:
    layer  0-16: names 0.00, end 1.00   (the names' identity lives only at the name tokens)
    layer 18:    names -0.01, end 0.96
    layer 20:    names -0.07, end 0.47  (name information is moving to the final token)
    layer 22:    names -0.04, end 0.45
    layer 24+:   names 1.07, end -0.04  (it has all arrived; the name positions no longer matter)
so blocks.22.hook_resid_post is the latest point where both the name positions and the final position
carry what the answer needs: a feature circuit there has features at the names and at `end`.

Training text: the Python docs' topics (pydoc_data, real prose) mixed with IOI-style sentences generated
from the task's own templates and names with another seed (mechscope.tasks.make_task("ioi", seed=1),
each sentence completed with its answer, plus its ABC counterfactual), so the dictionary sees the task's
distribution. Any generated sentence whose prompt equals one of the test prompts is dropped, so the
IOI test prompts themselves are never trained on. Held-out metrics: the IOI test sentences (with their
answers) and prose sequences not trained on.

Prints key=value lines; writes the SAE, scores and curve under --out (git-ignored runs/) and the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

K, EXPANSION, SEQ_PER_STEP, LENGTH = 32, 8, 8, 128
HOOK = "blocks.22.hook_resid_post"


def _prose() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _ioi_sentences(examples, completions: bool = True) -> list[str]:
    """Each pair as two sentences: the clean prompt with its answer, the counterfactual with its own
    third name (which keeps the sentence grammatical)."""
    out = []
    for ex in examples:
        m = ex.meta
        out.append(f"{ex.clean_text} {m['io']}.")
        if completions:
            out.append(f"{ex.counterfactual_text} {m['cf_names'][0]}.")
    return out


def _firing(model, sae, ds, latents: list[int], hook: str, top: int = 5, which: str = "clean"):
    """For each latent: its `top` largest activations over the `which` (clean/counterfactual) test prompts, as (value, token, span,
    example index), and the fraction of prompts in which it fires at all."""
    import torch

    from mechscope.attribution.peap import batch_span_of
    from mechscope.devices import model_device

    device = model_device(model)
    spans = list(ds.schema.spans)
    found = {i: [] for i in latents}
    fires = {i: 0 for i in latents}
    store = {}

    def keep(act, hook=None):
        store["x"] = act.detach()
        return act

    with torch.no_grad():
        for indices, batch in ds.batches(16):
            batch = batch.to(device)
            with model.hooks(fwd_hooks=[(hook, keep)]):
                model(getattr(batch, which), attention_mask=batch.attention_mask)
            f = sae.encode(store["x"].to(sae.dtype))[..., latents]  # [b, t, n]
            span_of = batch_span_of(ds, indices, batch.clean.shape[1], device)
            f = f * (span_of >= 0)[..., None]
            for j, lat in enumerate(latents):
                fj = f[..., j]
                fires[lat] += int((fj > 0).any(-1).sum())
                vals, flat = fj.flatten().topk(min(top, fj.numel()))
                for v, p in zip(vals.tolist(), flat.tolist()):
                    if v <= 0:
                        continue
                    b, t = divmod(p, fj.shape[1])
                    tok = model.tokenizer.decode([int(getattr(batch, which)[b, t])])
                    found[lat].append((v, tok, spans[int(span_of[b, t])], indices[b]))
    return {lat: (sorted(found[lat], reverse=True)[:top], fires[lat] / len(ds)) for lat in latents}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default=HOOK)
    ap.add_argument("--tokens", type=int, default=32512, help="training positions (BOS excluded), whole steps of "
                    f"{SEQ_PER_STEP} x {LENGTH - 1}")
    ap.add_argument("--ioi-fraction", type=float, default=0.3, help="share of training sequences that are IOI text")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--examples", type=int, default=32, help="IOI test pairs attributed and evaluated")
    ap.add_argument("--ns", default="0,1,4,16,64,256,1024")
    ap.add_argument("--ns-error-ablated", default="0,16,256",
                    help="n of the curve with the error ablated too ('' to skip)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out prose sequences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/sae-ioi"))
    ap.add_argument("--figure", type=Path, default=Path("docs/images/sae-ioi-curve.png"))
    ap.add_argument("--retrain", action="store_true", help="train again even if --out holds an SAE")
    args = ap.parse_args()

    import torch

    from mechscope.dictionaries import ActivationBuffer, Dictionary, DictionaryConfig, measure, train
    from mechscope.dictionaries.activations import _bos_id, hook_widths
    from mechscope.dictionaries.features import attribute_latents, faithfulness, feature_curve
    from mechscope.lens.text import model_fingerprint, tokenize_text
    from mechscope.models import load_model
    from mechscope.report.figures import feature_curve_png
    from mechscope.tasks import make_task

    t_all = time.perf_counter()
    ns = [int(s) for s in args.ns.split(",") if s.strip()]
    ns_err = [int(s) for s in args.ns_error_ablated.split(",") if s.strip()]
    model = load_model(args.model, device=args.device)
    tok = model.tokenizer
    bos = _bos_id(tok)

    # -- data -----------------------------------------------------------------------------------------
    test = make_task("ioi", tok, n=args.examples, seed=args.seed)
    test_prompts = {ex.clean_text for ex in test.examples} | {ex.counterfactual_text for ex in test.examples}
    per_seq = LENGTH - 1
    steps = max(1, args.tokens // (SEQ_PER_STEP * per_seq))
    n_train = steps * SEQ_PER_STEP
    n_ioi = int(round(n_train * args.ioi_fraction))
    gen = make_task("ioi", tok, n=max(64, n_ioi * per_seq // 40 + 64), seed=args.seed + 1)
    kept = [ex for ex in gen.examples if ex.clean_text not in test_prompts and ex.counterfactual_text not in test_prompts]
    ioi_train = tokenize_text(_ioi_sentences(kept), tok, LENGTH,
                              source="generated IOI text")
    prose = tokenize_text(_prose(), tok, LENGTH, source="pydoc topics")
    if prose.shape[0] < n_train - n_ioi + args.held_out or ioi_train.shape[0] < n_ioi:
        sys.exit(f"not enough text: {prose.shape[0]} prose / {ioi_train.shape[0]} IOI sequences for {n_train} "
                 f"training ({n_ioi} IOI) + {args.held_out} held out")
    prose_held = prose[-args.held_out:]
    train_tokens = torch.cat([prose[: n_train - n_ioi], ioi_train[:n_ioi]])
    g = torch.Generator().manual_seed(args.seed)
    train_tokens = train_tokens[torch.randperm(train_tokens.shape[0], generator=g)]
    ioi_held = tokenize_text(_ioi_sentences(test.examples, completions=False), tok, 64, source="IOI test sentences")
    print(f"model={args.model} hook={args.hook} k={K} d_sae={EXPANSION}x threads={torch.get_num_threads()} "
          f"device={args.device}")
    print(f"training_text=pydoc_topics+generated_ioi (IOI share {n_ioi}/{n_train} sequences of {LENGTH}; generated "
          f"IOI pairs seed={args.seed + 1}, {len(gen) - len(kept)} dropped as equal to a test prompt; test pairs "
          f"seed={args.seed} never trained on)")
    print(f"train_sequences={n_train} steps={steps} batch={SEQ_PER_STEP}x{per_seq} "
          f"tokens={int((train_tokens != bos).sum())}")
    sys.stdout.flush()

    # -- the SAE --------------------------------------------------------------------------------------
    sae_dir = args.out / "sae"
    if sae_dir.is_dir() and not args.retrain:
        sae = Dictionary.load(sae_dir, device=args.device)
        print(f"sae={sae_dir} (loaded; --retrain to train again)")
    else:
        d_in = hook_widths(model, [args.hook])[args.hook]
        config = DictionaryConfig("topk", d_in, EXPANSION * d_in, args.hook, k=K, model_name=args.model,
                                  model_fingerprint=model_fingerprint(model))
        sae = Dictionary(config, device=args.device).init_weights(args.seed)
        start = time.perf_counter()
        buffer = ActivationBuffer(model, args.hook, train_tokens, batch_size=SEQ_PER_STEP * per_seq, seed=args.seed,
                                  loop=False, drop_last=True, progress=False)
        result = train(sae, buffer, steps, lr=args.lr, progress=False)
        seconds = time.perf_counter() - start
        sae.save(sae_dir, overwrite=True)
        print(f"train_seconds={seconds:.1f} train_tokens={result.tokens} tokens_per_s={result.tokens / seconds:.1f}")
    sae.eval()
    for name, held in (("ioi", ioi_held), ("prose", prose_held)):
        m = measure(model, sae, held)
        print(f"heldout_{name}_fvu={m.fvu:.4f} heldout_{name}_l0={m.l0:.2f} "
              f"heldout_{name}_ce_recovered_zero={m.ce_recovered_zero:.4f} "
              f"heldout_{name}_ce_recovered_mean={m.ce_recovered_mean:.4f} heldout_{name}_kl={m.kl:.4f} "
              f"heldout_{name}_predictions={m.predictions}")
    sys.stdout.flush()

    # -- attribution ----------------------------------------------------------------------------------
    start = time.perf_counter()
    scores = attribute_latents(model, sae, test, ablation="counterfactual", progress=False)
    h = args.hook
    lat, err = scores.latents[h], scores.error[h]
    total = float(scores.node_total(h).sum())
    err_total = float(err.sum())
    abs_share = float(err.abs().sum() / (lat.abs().sum() + err.abs().sum()))
    print(f"attribution_seconds={time.perf_counter() - start:.1f} examples={len(test)}")
    print(f"hook_eap_total={total:.4f} error_eap={err_total:.4f} latents_eap={float(lat.sum()):.4f} "
          f"error_share_signed={err_total / total:.4f} error_share_abs={abs_share:.4f}")
    print("per_span " + " ".join(f"{s}:latents={float(lat[i].sum()):+.3f},error={float(err[i]):+.3f}"
                                 for i, s in enumerate(scores.spans)))
    spans = list(scores.spans)
    flat = lat.abs().flatten().argsort(descending=True)[:10]
    top = [(spans[int(p) // lat.shape[1]], int(p) % lat.shape[1], float(lat.flatten()[p])) for p in flat]
    firing = _firing(model, sae, test, sorted({i for _, i, _ in top}), h)
    silent = sorted({i for _, i, _ in top if not firing[i][0]})
    cf_firing = _firing(model, sae, test, silent, h, which="counterfactual") if silent else {}
    for rank, (span, i, s) in enumerate(top, 1):
        examples, rate = firing[i]
        if i in cf_firing:  # silent on the clean prompts: its score is its counterfactual value removed
            examples, cf_rate = cf_firing[i]
            print(f"  (latent {i} never fires on the clean prompts; on the counterfactuals in {cf_rate:.2f} of them)")
        where = ", ".join(f"{t!r}@{sp}:{v:.1f}" for v, t, sp, _ in examples)
        print(f"top{rank} span={span} latent={i} score={s:+.4f} fires_in={rate:.2f}_of_prompts max_tokens=[{where}]")
    sys.stdout.flush()

    # -- the curve ------------------------------------------------------------------------------------
    start = time.perf_counter()
    n_nodes = lat.numel()
    keep_all = {h: torch.ones_like(lat, dtype=torch.bool)}
    keep_none = {h: torch.zeros_like(lat, dtype=torch.bool)}
    m_clean = faithfulness(model, sae, test, keep_all, keep_error=True)
    m_abl = faithfulness(model, sae, test, keep_none, keep_error=False)
    norm = lambda m: (m - m_abl) / (m_clean - m_abl)  # noqa: E731
    print(f"metric_clean={m_clean:.4f} metric_ablated={m_abl:.4f} (all {n_nodes} latent nodes and the error "
          "at their counterfactual values)")
    curve = feature_curve(model, sae, test, scores, ns, keep_error=True)
    for n, m in curve:
        print(f"curve_error_kept n={n} metric={m:.4f} faithfulness={norm(m):.4f}")
    curves = {"error kept": [(n, norm(m)) for n, m in curve]}
    title = (f"IOI feature circuit, {args.model} {h}, TopK k={K} {sae.config.d_sae} latents, "
             f"{len(test)} pairs, counterfactual ablation")
    feature_curve_png(curves, title, args.figure)  # drawn now and again with the second curve
    curve_err = []
    if ns_err:
        curve_err = feature_curve(model, sae, test, scores, ns_err, keep_error=False)
        for n, m in curve_err:
            print(f"curve_error_ablated n={n} metric={m:.4f} faithfulness={norm(m):.4f}")
        curves["error ablated"] = [(n, norm(m)) for n, m in curve_err]
    print(f"curve_seconds={time.perf_counter() - start:.1f}")

    feature_curve_png(curves, title, args.figure)
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"latents": lat.contiguous(), "error": err.contiguous()}, str(args.out / "scores.safetensors"))
    (args.out / "curve.json").write_text(json.dumps({
        "hook_point": h, "spans": spans, "examples": len(test), "metric_clean": m_clean, "metric_ablated": m_abl,
        "error_kept": [[n, m, norm(m)] for n, m in curve],
        "error_ablated": [[n, m, norm(m)] for n, m in curve_err],
        "top": [[s, i, v] for s, i, v in top], "error_share_signed": err_total / total,
        "error_share_abs": abs_share}, indent=1))
    print(f"figure={args.figure} out={args.out}")
    print(f"total_seconds={time.perf_counter() - t_all:.1f}")
    return 0 if all(math.isfinite(f) for _, f in curves["error kept"]) else 1


if __name__ == "__main__":
    sys.exit(main())
