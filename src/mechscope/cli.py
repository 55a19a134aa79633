"""`mechscope <verb>`: a thin command-line layer over the library.

Errors a user can cause (`MechscopeError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MechscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mechanistic interpretability workbench.")
console = Console()
err_console = Console(stderr=True)

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _user_errors(fn):
    """Turn a MechscopeError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MechscopeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)

    return wrapper


@app.command()
@_user_errors
def models() -> None:
    """List the packaged models: installed or not, size, layers x heads, how to install."""
    from .models import DEFAULT_MODEL, REGISTRY

    table = Table(title="Packaged models")
    for col in ("alias", "installed", "parameters", "layers x heads (kv)", "install"):
        table.add_column(col)
    for alias, entry in REGISTRY.items():
        name = f"{alias} (default)" if alias == DEFAULT_MODEL else alias
        table.add_row(
            name,
            "yes" if entry.installed else "no",
            f"{entry.n_params / 1e6:.1f}M",
            f"{entry.n_layers} x {entry.n_heads} ({entry.n_kv_heads})",
            "" if entry.installed else entry.install_command,
        )
    console.print(table)
    console.print(
        "Any Hugging Face model also loads by local directory or hub id; a .gguf file by its path."
    )


@app.command()
@_user_errors
def demo(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model alias, .gguf, directory or hub id."),
    prompt: str = typer.Option(IOI_PROMPT, help="Prompt whose next token to predict."),
    top_k: int = typer.Option(5, help="How many candidate next tokens to show."),
) -> None:
    """Load a model, print its summary and its top next-token predictions on a prompt."""
    import torch

    from .models import load_model, model_summary

    with err_console.status(f"loading {model}"):
        bridge = load_model(model)
    summary = model_summary(bridge)
    table = Table(title=f"Model {summary['name']}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)

    with torch.no_grad():
        logits = bridge(prompt)[0, -1]
    probs = logits.float().softmax(-1)
    top = probs.topk(top_k)
    pred = Table(title=f"Next token after: {prompt!r}")
    pred.add_column("rank")
    pred.add_column("token")
    pred.add_column("probability")
    for rank, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        pred.add_row(str(rank), repr(bridge.tokenizer.decode([idx])), f"{p:.3f}")
    console.print(pred)


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
