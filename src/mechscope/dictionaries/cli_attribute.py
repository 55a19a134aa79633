"""`mechscope sae attribute`: a feature circuit. EAP over a spliced dictionary's latents and error per
schema span of a task (dictionaries/features.py), and the faithfulness curve of the top-n (span, latent)
nodes, normalised as circuits/evaluation.py does: (m − m_ablated) / (m_clean − m_ablated), where
m_ablated has every latent and the error at its reference."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _batch_option, _data_option, _device_option, _model_option, _task_option, console

SCORES, SUMMARY, CURVE, FIGURE = "scores.safetensors", "scores.json", "curve.json", "curve.png"
DEFAULT_NS = "0,1,2,4,8,16,32,64,128,256"


def _parse_ns(text: str) -> list[int]:
    from ..errors import ParameterError

    try:
        ns = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ParameterError(f"--ns must be comma-separated whole numbers, like 0,1,2,4; got {text!r}") from None
    if not ns or min(ns) < 0:
        raise ParameterError(f"--ns must list at least one number, none negative; got {text!r}")
    return ns


def top_nodes(scores, n: int) -> list[tuple[str, int, float]]:
    """[(span, latent, score)] of the `n` largest |score| (span, latent) nodes of the one hook point."""
    lat = scores.latents[scores._point(None)]
    order = lat.abs().flatten().argsort(descending=True, stable=True)[:n]
    return [(scores.spans[int(p) // lat.shape[1]], int(p) % lat.shape[1], float(lat.flatten()[p])) for p in order]


def error_share(scores) -> tuple[float, float]:
    """(signed, absolute) share of the hook point's attribution the error node carries: Σ error / Σ all,
    and Σ|error| / (Σ|latents| + Σ|error|) over spans."""
    h = scores._point(None)
    lat, err = scores.latents[h], scores.error[h]
    total = float(scores.node_total(h).sum())
    signed = float(err.sum()) / total if total else float("nan")
    return signed, float(err.abs().sum() / (lat.abs().sum() + err.abs().sum()))


def normalised_curve(model, sae, dataset, scores, ns, keep_error: bool, **kw) -> dict:
    """{'clean', 'ablated', 'points': [{n, metric, faithfulness}]} of the top-n feature circuits."""
    import torch

    from .features import faithfulness, feature_curve

    h = scores._point(None)
    lat = scores.latents[h]
    clean = faithfulness(model, sae, dataset, {h: torch.ones_like(lat, dtype=torch.bool)}, True, **kw)
    ablated = faithfulness(model, sae, dataset, {h: torch.zeros_like(lat, dtype=torch.bool)}, False, **kw)
    gap = clean - ablated
    points = [{"n": n, "metric": m, "faithfulness": (m - ablated) / gap if gap else float("nan")}
              for n, m in feature_curve(model, sae, dataset, scores, ns, keep_error=keep_error, **kw)]
    return {"clean": clean, "ablated": ablated, "points": points}


def _section(scores, curves: dict, top: list, shares: tuple[float, float], png: bytes, title: str):
    import base64
    from html import escape

    from ..report.page import Section

    rows = "".join(f"<tr><td>{i}</td><td>{escape(s)}</td><td>{lat}</td><td>{v:+.4f}</td></tr>"
                   for i, (s, lat, v) in enumerate(top, 1))
    curve_rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{p['n']}</td><td>{p['metric']:.4f}</td><td>{p['faithfulness']:.3f}</td></tr>"
        for name, c in curves.items() for p in c["points"])
    img = base64.b64encode(png).decode("ascii")
    html = (f"<p>{escape(title)}. EAP scores of every latent and of the error node ({escape(scores.ablation)} "
            f"ablation, metric {escape(scores.metric)}, {scores.n_examples} examples) summed over each schema span. "
            f"The error node carries {shares[0]:.3f} of the hook point's signed attribution "
            f"({shares[1]:.3f} of the absolute).</p>"
            f"<img alt='faithfulness curve' style='max-width:100%' src='data:image/png;base64,{img}'>"
            "<table><tr><th>#</th><th>span</th><th>latent</th><th>score</th></tr>" + rows + "</table>"
            "<table><tr><th>curve</th><th>n</th><th>metric</th><th>normalised faithfulness</th></tr>"
            + curve_rows + "</table>")
    return Section(id="feature-circuit", title="Feature circuit", html=html)


def attribute_command(
    model: str = _model_option(),
    sae_dir: Path = typer.Option(..., "--sae", help="A dictionary directory: mechscope's, SAELens' or sparsify's."),
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    n: Optional[int] = typer.Option(None, "--n", help="Generated pairs with --task (default 64); with --data its "
                                    "first N (default all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated pairs."),
    ablation: str = typer.Option("counterfactual", "--ablation", help="counterfactual, mean or zero."),
    ns: str = typer.Option(DEFAULT_NS, "--ns", help="Numbers of top (span, latent) nodes on the curve."),
    error_ablated: bool = typer.Option(False, "--error-ablated", help="Also draw the curve with the error ablated."),
    top: int = typer.Option(10, "--top", help="Top nodes listed in the report."),
    batch_size: Optional[int] = _batch_option(),
    out: Path = typer.Option(..., "--out", "-o", help="New directory: scores, curve and report.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous output directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Attribute a task's metric to a dictionary's latents and error per schema span (EAP) and draw the
    faithfulness curve of the top-n feature circuits."""
    import json
    import tempfile

    from safetensors.torch import save_file

    from ..cli_common import _task_or_data
    from ..devices import model_device, resolve_device
    from ..errors import check_count
    from ..fileio import write_json
    from ..report import check_output_dir, write_sections
    from ..report.figures import feature_curve_png
    from ..attribution.references import check_ablation
    from .dictionary import DictionaryError
    from .features import attribute_latents
    from .interop import load_any

    check_ablation(ablation)
    points = _parse_ns(ns)
    if n is not None:
        check_count("--n", n)
    check_count("--top", top)
    resolve_device(device)
    check_output_dir(out, overwrite)
    sae = load_any(sae_dir)  # a missing, corrupt or foreign directory fails before the model loads
    if sae.config.architecture == "crosscoder":
        raise DictionaryError(f"{sae_dir}: a crosscoder cannot be spliced into one forward pass")
    bridge, dataset = _task_or_data(task, data_file, model, n or 64, seed, n_data=n, device=device)
    sae = sae.to(model_device(bridge))
    sae.check_model(bridge)  # an unknown hook point lists the valid ones; a width that does not fit is named
    scores = attribute_latents(bridge, sae, dataset, ablation, batch_size=batch_size)
    h = scores._point(None)
    kw = {"ablation": ablation, "batch_size": batch_size}
    curves = {"error kept": normalised_curve(bridge, sae, dataset, scores, points, True, **kw)}
    if error_ablated:
        curves["error ablated"] = normalised_curve(bridge, sae, dataset, scores, points, False, **kw)
    nodes = top_nodes(scores, top)
    shares = error_share(scores)
    title = f"{sae.config.architecture} dictionary of {sae.config.d_sae} latents at {h} on {model}"
    with tempfile.TemporaryDirectory() as tmp:
        fig = Path(tmp) / FIGURE
        feature_curve_png({k: [(p["n"], p["faithfulness"]) for p in c["points"]] for k, c in curves.items()},
                          title, fig)
        png = fig.read_bytes()
    summary = {"hook_point": h, "spans": list(scores.spans), "metric": scores.metric, "ablation": ablation,
               "examples": scores.n_examples, "sae": str(sae_dir), "model": model,
               "error_share_signed": shares[0], "error_share_abs": shares[1],
               "top": [{"span": s, "latent": i, "score": v} for s, i, v in nodes]}
    files = {
        SCORES: lambda p: save_file({"latents": scores.latents[h].contiguous(), "error": scores.error[h].contiguous()},
                                    str(p), metadata={"hook_point": h, "spans": json.dumps(list(scores.spans))}),
        SUMMARY: lambda p: write_json(p, summary),
        CURVE: lambda p: write_json(p, curves),
        FIGURE: lambda p: Path(p).write_bytes(png),
    }
    write_sections(out, f"Feature circuit at {h}", [_section(scores, curves, nodes, shares, png, title)], files,
                   subtitle=f"{sae_dir} on {model}", overwrite=overwrite)
    for name, c in curves.items():
        console.print(f"{name}: " + ", ".join(f"n={p['n']} f={p['faithfulness']:.3f}" for p in c["points"]),
                      highlight=False)
    console.print(f"error share {shares[0]:.3f} (signed), {shares[1]:.3f} (abs); wrote {out}/report.html, "
                  f"{SCORES}, {SUMMARY}, {CURVE}, {FIGURE}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `attribute` to the typer app given (the `mechscope sae` sub-app)."""
    from ..cli_common import _user_errors

    app.command("attribute")(_user_errors(attribute_command))
