"""How well EAP and EAP-IG rank edges compared with exact patching (docs/method.md §3).

On a tiny random Llama every edge is patched exactly; on SmolLM2 (IOI) a subset of edges is: the
--top edges of largest |EAP| score plus --random others drawn with the seed. Prints the Spearman rank
correlation of each estimator with the exact scores.

    .venv/bin/python benchmarks/spearman_exact.py [--n 16] [--top 40] [--random 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from scipy.stats import spearmanr

import mechscope
from mechscope.attribution import attribute
from mechscope.tasks import make_task


def compare(model, dataset, edges=None, steps=5) -> dict:
    eap = attribute(model, dataset, "eap", progress=False)
    ig = attribute(model, dataset, "eap-ig", steps=steps, progress=False)
    exact = attribute(model, dataset, "exact", edges=edges, progress=False)
    keep = ~torch.isnan(exact.values)
    return {
        "n_edges": int(keep.sum()),
        "eap": spearmanr(eap.values[keep], exact.values[keep]).correlation,
        "eap-ig": spearmanr(ig.values[keep], exact.values[keep]).correlation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="IOI examples")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--random", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny  # the tiny-model builders the unit tests use

    tok = tiny.build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        small = mechscope.load_model(str(tiny.save_model_dir(Path(tmp) / "llama", "llama", tok)), device="cpu")
        r = compare(small, make_task("ioi", small.tokenizer, args.n, seed=args.seed))
    print(f"tiny-llama ioi n={args.n} all {r['n_edges']} edges: spearman eap={r['eap']:.3f} eap-ig={r['eap-ig']:.3f}")

    model = mechscope.load_model("smollm2-135m", device="cpu")
    data = make_task("ioi", model.tokenizer, args.n, seed=args.seed)
    eap = attribute(model, data, "eap", progress=False)
    order = eap.values.abs().argsort(descending=True)
    top = order[: args.top]
    g = torch.Generator().manual_seed(args.seed)
    rest = order[args.top :][torch.randperm(len(order) - args.top, generator=g)[: args.random]]
    r = compare(model, data, edges=torch.cat([top, rest]))
    print(
        f"smollm2-135m ioi n={args.n} {r['n_edges']} edges (top {args.top} by |eap| + {args.random} random): "
        f"spearman eap={r['eap']:.3f} eap-ig={r['eap-ig']:.3f}"
    )


if __name__ == "__main__":
    main()
