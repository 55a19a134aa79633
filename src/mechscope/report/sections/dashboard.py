"""The report's feature dashboard section: an index of a dictionary's latents (search by id or by a
token among its top activations and promoted tokens; sort by density, maximum or mean activation, id)
and one latent's dashboard drawn when it is clicked (assets/dashboard.js): its top contexts with each
token shaded by the latent's activation, its activation histogram and density, the tokens its decoder
direction promotes and suppresses, and examples at activation quantiles.

The data are typed-array columns (report/page.py `column`), latent-major, so tens of thousands of
latents stay a few bytes each per example token: per-token activations in a context are u8 (0-255 of
the latent's maximum), token texts are indices into one table of the strings shown."""

from __future__ import annotations

import numpy as np
import torch

from ..page import Section, column

HTML = """
<p class="note" id="db-meta"></p>
<div class="controls db-controls">
 <label>search <input id="db-search" type="search" placeholder="latent id, a token, or prefix*" size="26"></label>
 <label>sort <select id="db-sort">
  <option value="density">density</option><option value="max">max activation</option>
  <option value="mean">mean activation</option><option value="id">id</option></select></label>
 <label><input id="db-dead" type="checkbox"> dead latents</label>
 <span id="db-count" class="note"></span>
</div>
<div class="db-layout">
 <div class="db-index">
  <table id="db-table"><thead><tr><th>latent</th><th>density</th><th>max</th><th>top token</th>
   <th>promotes</th></tr></thead><tbody></tbody></table>
  <div class="db-pager"><button id="db-prev" type="button">&lsaquo; prev</button> <span id="db-page"></span>
   <button id="db-next" type="button">next &rsaquo;</button></div>
 </div>
 <div id="db-latent" class="db-latent"><p class="note">Click a latent to see its dashboard.</p></div>
</div>
"""


def _small_int(values: np.ndarray) -> str:
    return "u16" if values.size == 0 or values.max(initial=0) < 65536 else "u32"


def payload(dash, contexts: int = 10, bands: int = 4, per_band: int = 2, logit_tokens: int = 10) -> dict:
    """The section's data from a `Dashboards` (dictionaries/dashboard.py)."""
    t = dash.tensors
    L = dash.n_latents
    N = min(contexts, int(t["top_value"].shape[1]))
    W = dash.config.window
    ids = sorted(dash.strings)
    index_of = np.full(max(ids) + 1 if ids else 1, 0, dtype=np.int64)
    index_of[ids] = np.arange(len(ids))
    tokens = index_of[dash.tokens.numpy()].reshape(-1)

    top_value = t["top_value"][:, :N].float()
    peak = top_value[:, 0].clamp(min=1e-30)[:, None, None]

    def u8(window):  # activations as 0..255 of the latent's maximum
        return (window / peak * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    q = dash.quantile_indices(bands, per_band)                              # [L, Q]
    qs = q.clamp(min=0)
    q_token = torch.where(q >= 0, t["sample_token"].gather(1, qs), torch.full_like(q, -1))
    q_value = t["sample_value"].gather(1, qs)
    q_window = t["sample_window"].gather(1, qs[..., None].expand(-1, -1, W))
    count = t["count"]
    hist = t["hist"].numpy().reshape(-1)
    data = {
        "n": L, "top": N, "bands": bands, "per_band": per_band, "before": dash.config.before,
        "after": dash.config.after, "T": int(dash.tokens.shape[1]), "bins": dash.config.bins,
        "log2_range": list(dash.config.log2_range), "meta": dash.meta, "strings": [dash.strings[i] for i in ids],
        "tokens": column(tokens, _small_int(tokens)),
        "density": column(dash.density.numpy(), "f32"), "max": column(top_value[:, 0].numpy(), "f32"),
        "mean": column(dash.mean_activation.numpy(), "f32"), "count": column(count.numpy(), "u32"),
        "hist": column(hist, _small_int(hist)),
        "top_token": column(t["top_token"][:, :N].numpy().reshape(-1), "i32"),
        "top_value": column(top_value.numpy().reshape(-1), "f32"),
        "top_window": column(u8(t["top_window"][:, :N]).reshape(-1), "u8"),
        "q_token": column(q_token.numpy().reshape(-1), "i32"),
        "q_value": column(q_value.numpy().reshape(-1), "f32"),
        "q_window": column(u8(q_window).reshape(-1), "u8"),
        "logits": None,
    }
    if "promoted_token" in t:
        K = min(logit_tokens, int(t["promoted_token"].shape[1]))
        data["logits"] = {
            "k": K,
            "up": column(index_of[t["promoted_token"][:, :K].numpy()].reshape(-1), "i32"),
            "up_value": column(t["promoted_logit"][:, :K].numpy().reshape(-1), "f32"),
            "down": column(index_of[t["suppressed_token"][:, :K].numpy()].reshape(-1), "i32"),
            "down_value": column(t["suppressed_logit"][:, :K].numpy().reshape(-1), "f32")}
    return data


def section(dash, title: str = "Feature dashboards", **kwargs) -> Section:
    """The dashboard section of `dash` (a Dashboards); kwargs go to `payload`."""
    return Section(id="dashboard", title=title, html=HTML, data=payload(dash, **kwargs),
                   assets=("dashboard.js", "dashboard.css"))
