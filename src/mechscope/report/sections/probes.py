"""The probes section: per-layer held-out accuracy of the linear probe, its control task and selectivity,
the sparse probes, and CCS (mean and min-max over seeds) beside the supervised probe's pair accuracy,
for one or more concepts: a PNG figure and a table per concept. Built from `ProbeStudy.summary()`
dicts, so a saved summary.json renders the same."""

from __future__ import annotations

import base64
import html
import io

from ..page import Section
from .summary import fmt


def _x(rows):
    return [r["layer"] if r.get("layer") is not None else i for i, r in enumerate(rows)]


def probe_figure_png(summaries: list[dict]) -> bytes:
    """One panel per concept: accuracy, control accuracy, selectivity, pair accuracy and CCS (with its
    min-max band over seeds) against the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summaries)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), constrained_layout=True, squeeze=False)
    for ax, s in zip(axes[0], summaries):
        rows, x = s["rows"], _x(s["rows"])
        ax.plot(x, [r["accuracy"] for r in rows], marker="o", ms=3, label="linear probe")
        if rows and "control_accuracy" in rows[0]:
            ax.plot(x, [r["control_accuracy"] for r in rows], ls="--", label="control task")
            ax.plot(x, [r["selectivity"] for r in rows], ls=":", label="selectivity")
        if rows and "pair_accuracy" in rows[0]:
            ax.plot(x, [r["pair_accuracy"] for r in rows], lw=0.9, label="probe, pairs")
        if rows and "ccs_mean" in rows[0]:
            ax.plot(x, [r["ccs_mean"] for r in rows], marker="s", ms=3,
                    label=f"CCS, pairs ({rows[0]['ccs_seeds']} seeds)")
            ax.fill_between(x, [r["ccs_min"] for r in rows], [r["ccs_max"] for r in rows], alpha=0.2, color="C4")
        ax.axhline(0.5, color="#999", lw=0.8, ls=":")
        low = min([r.get("selectivity", 0.0) for r in rows] + [0.0])
        ax.set_ylim(min(-0.05, low - 0.05), 1.05)
        ax.set_xlabel("layer (residual stream after it)" if rows and rows[0].get("layer") is not None else "hook point")
        ax.set_title(f"{s['concept']} ({s['n_train']} train / {s['n_test']} test)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Probes on {summaries[0]['model']}" if summaries else "Probes")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


_COLUMNS = [("accuracy", "accuracy"), ("control_accuracy", "control"), ("selectivity", "selectivity"),
            ("l1_accuracy", "L1"), ("l1_nonzero", "L1 non-zero"), ("topk_accuracy", "top-k"),
            ("pair_accuracy", "probe (pairs)"), ("ccs_mean", "CCS mean"), ("ccs_std", "CCS std"),
            ("ccs_min", "CCS min"), ("ccs_max", "CCS max")]


def _table(summary: dict) -> str:
    rows = summary["rows"]
    cols = [(k, name) for k, name in _COLUMNS if rows and k in rows[0]]
    head = "<th>hook point</th>" + "".join(f"<th>{html.escape(n)}</th>" for _, n in cols)
    body = "".join("<tr><td>" + html.escape(r["hook_point"]) + "</td>"
                   + "".join(f"<td class=num>{fmt(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    b = summary.get("behaviour")
    note = ""
    if b:
        acc = "" if b.get("accuracy") is None else f", accuracy {fmt(b['accuracy'])} on labelled prompts"
        words = f'{html.escape(" ".join(b["positive_words"]))} vs {html.escape(" ".join(b["negative_words"]))}'
        note = (f'<p class="note">Behaviour: mean logit difference {fmt(b["mean_score"])} over {b["n_prompts"]} '
                f'held-out prompts ({words})'
                f'{acc}.</p>')
    best = max(rows, key=lambda r: r["accuracy"]) if rows else None
    lead = (f'<p>Best layer: <b>{html.escape(best["hook_point"])}</b>, held-out accuracy {fmt(best["accuracy"])}'
            + (f', selectivity {fmt(best["selectivity"])}' if "selectivity" in best else "") + ".</p>") if best else ""
    return (f"<h3>{html.escape(summary['concept'])}</h3>{lead}{note}<details><summary>Table</summary>"
            f"<table><tr>{head}</tr>{body}</table></details>")


def section(summaries: list[dict], png: bytes | None = None) -> Section:
    """The "probes" section of one or more `ProbeStudy.summary()` dicts (`png`: the figure, drawn when
    not given)."""
    png = probe_figure_png(summaries) if png is None else png
    img = base64.b64encode(png).decode("ascii")
    body = (f"<figure><img alt='probe accuracy per layer' style='max-width:100%' src='data:image/png;base64,{img}'>"
            "</figure><p class=\"note\">Accuracy: logistic-regression probe on held-out texts. Control: the same probe "
            "trained on a random label per word type (Hewitt &amp; Liang); selectivity = accuracy - control. CCS "
            "(Burns et al.) is unsupervised and judges contrast pairs, up to sign; the band is its min-max over seeds, "
            "and 'probe, pairs' is the supervised probe judged the same way.</p>"
            + "".join(_table(s) for s in summaries))
    return Section(id="probes", title="Probes", html=body)
