"""The lens section: the mean KL(final || lens) per layer on held-out text (a table and an interactive
chart, log axis), and the top predictions of each lens at each layer and position of a prompt, as a
grid with the top-k in a tooltip (drawn by assets/lens.js)."""

from __future__ import annotations

import html

from ..page import Section
from .summary import fmt


def _training_note(config: dict | None) -> str:
    if not config:
        return '<p class="note">No tuned lens given: the logit lens alone.</p>'
    text = config.get("text") or {}
    source = ("text sampled from the model itself (seed {seed}, {count} x {length} tokens, temperature 1, no top-k)"
              .format(**{k: text.get(k, "?") for k in ("seed", "count", "length")})
              if text.get("source") == "sampled from the model" else html.escape(str(text.get("source", "unknown text"))))
    return (f'<p class="note">Tuned lens trained on {fmt(config.get("training_tokens"), 0)} positions of {source}, '
            f'{fmt(config.get("steps"), 0)} Adam steps, seed {html.escape(str(config.get("seed")))}, '
            f'{fmt(config.get("training_seconds"))} s.</p>')


def section(evaluation, predictions=None, lens_config: dict | None = None) -> Section:
    """The "lens" section of a `LensEvaluation` and, when given, a `LensPredictions` grid;
    `lens_config`: the tuned lens's configuration, for a note on how it was trained."""
    lenses = list(evaluation.kl)
    head = "".join(f"<th>KL {html.escape(name)} lens</th>" for name in lenses)
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td>" + "".join(f"<td class=num>{fmt(evaluation.kl[name][i], 4)}</td>" for name in lenses)
        + "</tr>" for i, s in enumerate(evaluation.streams))
    body = ('<div class="legend" id="lens-legend"></div><svg class="lens-chart" id="lens-kl"></svg>'
            f'<p class="note">Mean KL(final || lens) in nats over {evaluation.n_positions:,} held-out positions '
            '(BOS left out); layer l is the residual stream after layer l, embed the embedding.</p>'
            + _training_note(lens_config)
            + f'<details open><summary>Table</summary><table><tr><th>layer</th>{head}</tr>{rows}</table></details>')
    data = {"streams": evaluation.streams, "kl": evaluation.kl}
    if predictions is not None:
        body += ('<h3>Top predictions per layer</h3><div class="controls">lens <select id="lens-pick">'
                 + "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in predictions.top)
                 + f'</select><span class="note">prompt: {html.escape(predictions.prompt)}; hover a cell for the '
                 f'top {predictions.k}</span></div><div class="lens-grid-wrap"><table class="lens-grid" id="lens-grid">'
                 '</table></div>')
        data["predictions"] = {"tokens": predictions.tokens, "streams": predictions.streams, "top": predictions.top}
    return Section(id="lens", title="Logit lens and tuned lens", html=body, data=data, assets=("lens.js", "lens.css"))
