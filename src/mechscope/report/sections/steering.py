"""The steering section: behaviour and side-effect curves against α (a line per layer, an embedded PNG),
the table of every point with the best (layer, α) by effect per unit KL, and sample generations with
and without steering."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..page import Section
from .summary import fmt


def steering_png(sweep, path: str | Path | None = None, title: str = "") -> bytes:
    """Behaviour, KL and loss change against α, a line per hook point; written to `path` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    by_point: dict[str, list] = {}
    for p in sweep.points:
        by_point.setdefault(p.hook_point, []).append(p)
    panels = (("behaviour", "behaviour metric (held-out prompts)"), ("kl", "KL(unsteered || steered), nats"),
              ("loss_change", "change in next-token loss, nats"))
    for ax, (key, label) in zip(axes, panels):
        for name, pts in by_point.items():
            pts = sorted(pts, key=lambda p: p.alpha)
            layer = pts[0].layer
            ax.plot([p.alpha for p in pts], [getattr(p, key) for p in pts], marker="o", ms=3,
                    label=f"layer {layer}" if layer is not None else name)
        ax.set_xlabel("alpha")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].axhline(sweep.baseline, color="#999", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    best = sweep.best()
    if best is not None:
        axes[0].plot([best.alpha], [best.behaviour], marker="*", ms=14, color="k", ls="none", label="best")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def section(sweep, generations: list[dict] | None = None, title: str = "Steering", concept: str = "",
            ablation: dict | None = None) -> Section:
    """`sweep`: a measure.SteeringSweep; `generations`: [{"prompt", "alpha", "layer", "unsteered",
    "steered"}]; `ablation`: a measure.AblationResult's JSON, when one was run."""
    png = base64.b64encode(steering_png(sweep, title=concept)).decode("ascii")
    best = sweep.best()
    best_note = ("No (layer, alpha) moved the behaviour towards alpha's sign." if best is None else
                 f"Best by effect per unit KL (among points reaching half the largest effect): layer {best.layer} "
                 f"({html.escape(best.hook_point)}), alpha {fmt(best.alpha, 2)}: effect {fmt(best.effect)}, "
                 f"KL {fmt(best.kl, 4)} nats, {fmt(best.efficiency, 2)} per nat.")
    rows = "".join(
        f"<tr><td>{p.layer if p.layer is not None else html.escape(p.hook_point)}</td><td class=num>{fmt(p.alpha, 2)}</td>"
        f"<td class=num>{fmt(p.behaviour)}</td><td class=num>{fmt(p.effect)}</td><td class=num>{fmt(p.kl, 4)}</td>"
        f"<td class=num>{fmt(p.loss_change, 4)}</td></tr>" for p in sweep.points)
    body = (f"<figure><img alt='behaviour and side effects against alpha' style='max-width:100%' "
            f"src='data:image/png;base64,{png}'></figure>"
            f"<p class='note'>Unsteered behaviour {fmt(sweep.baseline)} on {sweep.config.get('prompts', '?')} held-out "
            f"prompts; side effects on {html.escape(str(sweep.config.get('neutral', '?')))} tokens of neutral text "
            f"(unsteered loss {fmt(sweep.base_loss)} nats). {best_note}</p>"
            "<details open><summary>Table</summary><table><tr><th>layer</th><th>alpha</th><th>behaviour</th>"
            f"<th>effect</th><th>KL</th><th>loss change</th></tr>{rows}</table></details>")
    if ablation:
        body += ("<h3>Directional ablation</h3><table><tr><th>behaviour before</th><th>after</th><th>KL</th>"
                 "<th>loss change</th></tr>"
                 f"<tr><td class=num>{fmt(ablation['behaviour_before'])}</td><td class=num>"
                 f"{fmt(ablation['behaviour_after'])}</td><td class=num>{fmt(ablation['kl'], 4)}</td>"
                 f"<td class=num>{fmt(ablation['loss_change'], 4)}</td></tr></table>")
    if generations:
        gen_rows = "".join(
            f"<tr><td>{html.escape(g['prompt'])}</td><td class=num>{g.get('layer', '')}</td>"
            f"<td class=num>{fmt(g['alpha'], 2)}</td><td>{html.escape(g['unsteered'])}</td>"
            f"<td>{html.escape(g['steered'])}</td></tr>" for g in generations)
        body += ("<h3>Sample generations</h3><table><tr><th>prompt</th><th>layer</th><th>alpha</th>"
                 f"<th>unsteered</th><th>steered</th></tr>{gen_rows}</table>")
    return Section(id="steering", title=title, html=body, data={"sweep": sweep.to_json()})
