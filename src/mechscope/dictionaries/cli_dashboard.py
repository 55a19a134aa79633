"""`mechscope sae dashboard`: feature dashboards of a dictionary on held-out text, as a report directory
(report.html with the dashboard section, plus dashboards.safetensors and dashboards.json, which
`Dashboards.load` reads back).

`register(app)` adds the command to the typer app given (the `sae` sub-app)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _device_option, _model_option, _user_errors

HELD_OUT_SEED = 1  # sampled held-out text: another seed than training's default (0)


def dashboard_command(
    model: str = _model_option(),
    sae: Path = typer.Option(..., "--sae", help="Dictionary directory (mechscope's, SAELens' or sparsify's layout)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text (.txt, .jsonl, `datasets` directory; "
                                        "default: text sampled from the model with --seed)."),
    tokens: int = typer.Option(16_384, "--tokens", help="Held-out tokens to read (rounded up to whole sequences)."),
    length: int = typer.Option(128, "--length", help="Tokens per sequence, BOS included."),
    seed: int = typer.Option(HELD_OUT_SEED, "--seed", help="Seed of the sampled held-out text."),
    top: int = typer.Option(20, "--top", help="Top-activating contexts kept per latent."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per forward pass."),
    device: Optional[str] = _device_option(),
    out: Path = typer.Option(..., "--out", "-o", help="New report directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report in --out."),
) -> None:
    """Feature dashboards: each latent's top contexts, activation histogram and density, promoted and
    suppressed tokens, and examples at activation quantiles, browsable for tens of thousands of latents."""
    from ..cli_common import console, err_console
    from ..devices import model_device, resolve_device
    from ..errors import check_count
    from ..models import load_model
    from ..report import check_output_dir, write_sections
    from .activations import training_tokens
    from .dashboard import DashboardConfig, compute_dashboards
    from .dictionary import DictionaryError
    from .interop import load_any

    check_count("--tokens", tokens)
    check_count("--length", length, 2)
    check_count("--top", top)
    if batch_size is not None:
        check_count("--batch-size", batch_size)
    resolve_device(device)
    check_output_dir(out, overwrite)
    if not sae.exists():
        raise DictionaryError(f"{sae}: no such dictionary directory")
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    dictionary = load_any(sae, device=model_device(bridge))
    dictionary.check_model(bridge)
    count = math.ceil(tokens / (length - 1))
    held_out = training_tokens(bridge, str(text) if text is not None else None, length=length, count=count,
                               seed=seed)
    dash = compute_dashboards(bridge, dictionary, held_out, config=DashboardConfig(top=top), batch_size=batch_size)
    c = dictionary.config
    title = f"mechscope: feature dashboards of a {c.architecture} dictionary at {c.hook_point}"
    write_sections(out, title, [dash.section()], dash.files(), subtitle=f"{model} · {sae}", overwrite=overwrite)
    alive = int((dash.tensors["count"] > 0).sum())
    console.print(f"wrote {out}: {dash.n_latents:,} latents ({alive:,} fire on the {dash.meta['n_tokens']:,} held-out "
                  "tokens); open report.html", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `dashboard` to the typer app given (the `mechscope sae` sub-app)."""
    app.command("dashboard")(_user_errors(dashboard_command))
