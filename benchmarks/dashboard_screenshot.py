"""The README's dashboard screenshot: a TopK SAE trained briefly on a model's residual stream (text: the
repository's own Markdown, README and docs/method.md for training, the other docs held out), its feature
dashboards written as a report directory, and a screenshot of one latent's dashboard in headless
chromium. Prints key=value lines (tokens, seconds, FVU, L0, dead latents). Run:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/dashboard_screenshot.py [--model smollm2-135m]
        [--layer 6] [--steps 200] [--out results/dashboard] [--png docs/images/dashboard.png]"""

from __future__ import annotations

import argparse
from html import unescape
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def paragraphs(files) -> list[str]:
    """Prose paragraphs of Markdown files (code blocks, tables and headings left out)."""
    out = []
    for f in files:
        text = re.sub(r"```.*?```", "", f.read_text(encoding="utf-8"), flags=re.S)
        for p in re.split(r"\n\s*\n", text):
            p = " ".join(line.strip() for line in p.splitlines())
            if len(p) > 80 and not p.startswith(("#", "|", "<", "!")):
                out.append(p)
    return out


def demo_latent(dash, contexts: int = 10) -> tuple[int, str]:
    """(latent, token) to show: among latents firing on 0.3-3% of the tokens, the one whose top
    contexts peak most often on one and the same word (not whitespace or punctuation); ties to the
    larger maximum."""
    T = int(dash.tokens.shape[1])
    best = (-1.0, 0.0, 0, "")
    for i in ((dash.density > 0.003) & (dash.density < 0.03)).nonzero().flatten().tolist():
        words = [dash.strings[int(dash.tokens[g // T, g % T])].strip()
                 for g in dash.tensors["top_token"][i, :contexts].tolist() if g >= 0]
        words = [w for w in words if len(w) > 1 and w.isalpha()]
        if words:
            word = max(set(words), key=words.count)
            best = max(best, (words.count(word) / contexts, float(dash.max_activation[i]), i, word))
    return best[2], best[3]


def build(args, out: Path):
    """Train the SAE, write its dashboards' report directory at `out`; the Dashboards."""
    import mechscope
    from mechscope.dictionaries import ActivationBuffer, Dictionary, DictionaryConfig, evaluate, train, training_tokens
    from mechscope.dictionaries.dashboard import compute_dashboards
    from mechscope.report import write_sections

    torch.manual_seed(0)
    model = mechscope.load_model(args.model, device="cpu")
    hook = f"blocks.{args.layer}.hook_resid_post"
    train_text = paragraphs([ROOT / "README.md", ROOT / "docs" / "method.md"])
    held_text = paragraphs([ROOT / "docs" / "formats.md", *sorted((ROOT / "docs" / "examples").rglob("*.md"))])
    train_tokens = training_tokens(model, train_text, length=args.length, progress=False)
    held_tokens = training_tokens(model, held_text, length=args.length, progress=False)
    d = int(model.cfg.d_model)
    sae = Dictionary(DictionaryConfig("topk", d_in=d, d_sae=args.expansion * d, hook_point=hook, k=args.k))
    sae.init_weights(0)
    buffer = ActivationBuffer(model, hook, train_tokens, batch_size=args.batch, loop=True, progress=False)
    t = time.time()
    train(sae, buffer, steps=args.steps, lr=1e-3, progress=False)
    train_s = time.time() - t
    stats = evaluate(sae, ActivationBuffer(model, hook, held_tokens, batch_size=1024, shuffle=False, progress=False))
    t = time.time()
    dash = compute_dashboards(model, sae, held_tokens, batch_size=8, progress=False)
    dash_s = time.time() - t
    dash.meta["model"] = args.model  # the alias, not the cache path the bridge names
    print(f"model={args.model} hook={hook} latents={sae.config.d_sae} train_tokens={args.steps * args.batch} "
          f"train_s={train_s:.0f} heldout_tokens={dash.meta['n_tokens']} fvu={stats.fvu():.3f} l0={stats.l0():.1f} "
          f"dead={int(stats.dead().sum())} dashboards_s={dash_s:.0f}")
    write_sections(out, f"mechscope: feature dashboards of a TopK SAE at {hook} of {args.model}", [dash.section()],
                   dash.files(), subtitle=f"{args.steps * args.batch:,} training tokens; "
                   f"held-out FVU {stats.fvu():.3f}, L0 {stats.l0():.1f}", overwrite=True)
    return dash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results" / "dashboard"))
    ap.add_argument("--reuse", action="store_true", help="redraw the page and screenshot from the dashboards "
                    "already in --out (no training)")
    ap.add_argument("--png", default=str(ROOT / "docs" / "images" / "dashboard.png"))
    args = ap.parse_args()

    from bench_dashboard import open_dashboard
    from viewer_pages import browser

    out = Path(args.out)
    if args.reuse:
        from mechscope.dictionaries.dashboard import Dashboards
        from mechscope.report.page import render_page

        dash = Dashboards.load(out)
        dash.meta["model"] = args.model
        dash.write_meta(out / "dashboards.json")
        html = (out / "report.html").read_text(encoding="utf-8")
        title = unescape(re.search(r"<title>(.*?)</title>", html).group(1))
        subtitle = unescape(re.search(r"<header><h1>.*?</h1>\n<p>(.*?)</p>", html).group(1))
        (out / "report.html").write_text(render_page(title, subtitle, [dash.section()]), encoding="utf-8")
    else:
        dash = build(args, out)
    latent, token = demo_latent(dash)
    with browser(1280, 900) as (context, blocked):
        errors: list[str] = []
        pg = open_dashboard(context, out / "report.html", errors)
        pg.evaluate(f"MS.dashboard.search({token.strip()!r})")
        pg.evaluate(f"MS.dashboard.open({latent})")
        pg.evaluate("document.getElementById('dashboard').scrollIntoView()")
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=args.png)
        assert not errors and not blocked, (errors, blocked)
    print(f"latent={latent} png={args.png} report={out / 'report.html'}")


if __name__ == "__main__":
    main()
