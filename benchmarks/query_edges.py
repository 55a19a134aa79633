"""Per-key against whole-row query edges (docs/method.md §3): how far the per-key scores of a query,
summed over its keys, are from the whole-row score of that query.

The per-key edge moves one logit of row t; the whole-row edge moves all of them at once. Summed over t'
the per-key scores agree with the whole-row score to first order in the logit changes, not exactly.
For every (example, layer, head, query position t) this prints the Pearson correlation of
sum_t' per_key[t, t'] with whole_row[t], the relative L2 difference ||sum - whole|| / ||whole||, and the
median of |sum - whole| / |whole| over the entries with |whole| >= 1e-3 * max |whole| (smaller ones
would divide by rounding noise); then the same at span level (the `sum` aggregation, [layer, head,
query span]).

    .venv/bin/python benchmarks/query_edges.py [--n 16] [--model smollm2-135m]

Without --model it runs the tiny random GPT-2 and Llama of the unit tests; with it, that model too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import mechscope
from mechscope.attribution.peap import crossing_scores
from mechscope.tasks import make_task


def token_level(model, data, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over keys of the per-key query scores, whole-row query scores) at every real query
    position: two 1-D tensors over (example, layer, head, t)."""
    summed, whole = [], []
    for _, batch in data.batches(batch_size):
        per_key = crossing_scores(model, batch, data.metric)["q"].sum(-1)  # [b, L, H, t]
        row = crossing_scores(model, batch, data.metric, query_edges="whole_row")["q"]
        real = batch.attention_mask.bool()[:, None, None, :].expand_as(row)
        summed.append(per_key[real].cpu())
        whole.append(row[real].cpu())
    return torch.cat(summed), torch.cat(whole)


def relation(summed: torch.Tensor, whole: torch.Tensor) -> str:
    pair = torch.stack([summed, whole]).double()
    corr = float(torch.corrcoef(pair)[0, 1])
    l2 = float((summed - whole).norm() / whole.norm())
    big = whole.abs() >= 1e-3 * whole.abs().max()
    median = float(((summed - whole).abs()[big] / whole.abs()[big]).median())
    return f"pearson={corr:.4f} rel_l2={l2:.4f} median_rel_diff={median:.4f} (over {int(big.sum())} of {len(whole)})"


def report(name: str, model, n: int, batch_size: int) -> None:
    data = make_task("ioi", model.tokenizer, n, seed=0)
    summed, whole = token_level(model, data, batch_size)
    print(f"{name} ioi n={n} token level (example, layer, head, t): {relation(summed, whole)}")
    per_key = mechscope.attribute(model, data, "peap", batch_size=batch_size, progress=False)
    row = mechscope.attribute(model, data, "peap", batch_size=batch_size, progress=False, query_edges="whole_row")
    span_sum = per_key.crossing["q"].sum(2)  # over key spans: [L, H, query span]
    print(f"{name} ioi n={n} span level (layer, head, query span): "
          f"{relation(span_sum.flatten(), row.crossing['q'].flatten())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="IOI examples")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default=None, help="also a packaged model, e.g. smollm2-135m")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny  # the tiny-model builders the unit tests use

    tok = tiny.build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        for seed, arch in enumerate(("gpt2", "llama")):
            model = mechscope.load_model(str(tiny.save_model_dir(Path(tmp) / arch, arch, tok, seed=seed)), device="cpu")
            report(f"tiny-{arch}", model, args.n, args.batch)
    if args.model:
        report(args.model, mechscope.load_model(args.model, device="cpu"), args.n, args.batch)


if __name__ == "__main__":
    main()
