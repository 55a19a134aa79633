"""The feature-dashboard section with a synthetic dictionary of 16,384 latents in headless chromium
(offline): page size, time to the first drawn index (from navigation start: parsing, decoding the
typed arrays and sorting included), a search by token, a search by id, each sort, paging, and opening
latents (each latent's dashboard is drawn on demand). Run:
    PYTHONPATH=src python benchmarks/bench_dashboard.py [--latents 16384] [--repeat 3] [--out timings.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

WORDS = ("the of and to in is was for on that with as by at from his her it an be this which or are had not "
         "but were one all their there been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another know while last")


def synthetic_dashboards(n_latents: int = 16_384, n_sequences: int = 256, length: int = 64, seed: int = 0,
                         top: int = 20, samples: int = 32):
    """A Dashboards of random but well-formed content: heavy-tailed densities (some dead latents),
    activations, histograms, windows and logit effects over a vocabulary of a few thousand strings."""
    from mechscope.dictionaries.dashboard import DashboardConfig, Dashboards

    g = torch.Generator().manual_seed(seed)
    cfg = DashboardConfig(top=top, samples=samples)
    words = WORDS.split()
    vocab = [f" {w}" for w in words] + [f"{w}" for w in words] + [f" {w}{i}" for w in words for i in range(20)]
    V = len(vocab)
    tokens = torch.randint(0, V, (n_sequences, length), generator=g)
    n_tokens = n_sequences * (length - 1)
    density = 10 ** (-4 * torch.rand(n_latents, generator=g, dtype=torch.float64))
    count = (density * n_tokens).long()
    count[torch.rand(n_latents, generator=g) < 0.03] = 0
    scale = 10 ** (torch.rand(n_latents, generator=g) * 2 - 0.5)
    hist = torch.zeros(n_latents, cfg.bins, dtype=torch.int64)
    centre = ((scale.log2() - cfg.log2_range[0]) / (cfg.log2_range[1] - cfg.log2_range[0]) * cfg.bins).long()
    for off, share in ((-3, 0.1), (-2, 0.2), (-1, 0.3), (0, 0.3), (1, 0.1)):
        hist.scatter_add_(1, (centre + off).clamp(0, cfg.bins - 1)[:, None], (count * share).long()[:, None])

    def examples(k, spread):
        value = (scale[:, None] * (1 - spread * torch.rand(n_latents, k, generator=g))).sort(1, descending=True).values
        token = torch.randint(1, n_tokens, (n_latents, k), generator=g)
        token = (token // (length - 1)) * length + token % (length - 1) + 1
        window = torch.rand(n_latents, k, cfg.window, generator=g) * value[..., None] * 0.6
        window[..., cfg.before] = value
        none = torch.arange(k)[None, :] >= count[:, None]
        return value.masked_fill(none, 0), token.masked_fill(none, -1), window.masked_fill(none[..., None], 0)

    tv, tt, tw = examples(top, 0.5)
    sv, st, sw = examples(samples, 0.99)
    logits = torch.randn(n_latents, V, generator=g) * scale[:, None]
    up, down = logits.topk(10, dim=1), (-logits).topk(10, dim=1)
    tensors = {"count": count, "total": count * scale.double() * 0.4, "hist": hist,
               "top_value": tv.float(), "top_token": tt, "top_window": tw.float(),
               "sample_value": sv.float(), "sample_token": st, "sample_window": sw.float(),
               "promoted_token": up.indices, "promoted_logit": up.values,
               "suppressed_token": down.indices, "suppressed_logit": -down.values}
    meta = {"model": "synthetic", "hook_point": "blocks.6.hook_resid_post", "architecture": "topk",
            "d_sae": n_latents, "n_sequences": n_sequences, "length": length, "n_tokens": n_tokens,
            "skipped_bos": n_sequences, "skipped_padding": 0, "norm_scale": 1.0, "logits": "synthetic"}
    return Dashboards(cfg, tokens, dict(enumerate(vocab)), tensors, meta)


def write_page(path: Path, dash, title: str = "dashboard test") -> Path:
    from mechscope.report.page import render_page

    path.write_text(render_page(title, "mechscope dashboard", [dash.section()]), encoding="utf-8")
    return path


def open_dashboard(context, path: Path, errors: list[str]):
    pg = context.new_page()
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(path.as_uri())
    pg.wait_for_function("window.MS && MS.dashboard && MS.dashboard.loadMs > 0", timeout=120_000)
    return pg


def interact(pg) -> dict[str, float]:
    """{name: ms} for each interaction, measured in the page (performance.now around the call)."""
    def timed(js):
        return pg.evaluate(f"(() => {{ const t = performance.now(); {js}; return performance.now() - t; }})()")

    t = {"load_to_index": pg.evaluate("MS.dashboard.loadMs"), "decode": pg.evaluate("MS.dashboard.decodeMs")}
    t["search_token"] = timed("MS.dashboard.search('the')")
    t["search_id"] = timed("MS.dashboard.search('12345')")
    t["search_clear"] = timed("MS.dashboard.search('')")
    for key in ("max", "mean", "id", "density"):
        t[f"sort_{key}"] = timed(f"MS.dashboard.sort('{key}')")
    t["next_page"] = timed("MS.dashboard.page(1)")
    n = pg.evaluate("MS.dashboard.state.order.length")
    opens = [timed(f"MS.dashboard.open({i})") for i in (0, n // 2, n - 1)]
    t["open_latent"] = statistics.median(opens)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    from viewer_pages import browser

    with tempfile.TemporaryDirectory() as tmp:
        dash = synthetic_dashboards(args.latents)
        path = write_page(Path(tmp) / "dashboard.html", dash)
        print(f"latents={args.latents} page_mb={path.stat().st_size / 1e6:.1f}")
        runs = []
        with browser(1280, 800) as (context, blocked):
            for _ in range(args.repeat):
                errors: list[str] = []
                pg = open_dashboard(context, path, errors)
                runs.append(interact(pg))
                pg.close()
                assert not errors and not blocked, (errors, blocked)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k, v in med.items():
        print(f"{k}_ms={v:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(med, indent=1))


if __name__ == "__main__":
    main()
