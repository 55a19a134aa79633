"""`mechscope toy list|train|analyze`: the toy models with known mechanisms from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _device_option, _user_errors, console, err_console

toy_app = typer.Typer(no_args_is_help=True, help="Toy models with known mechanisms: train, analyse, report.")


@toy_app.command("list")
@_user_errors
def toy_list() -> None:
    """The toys and what each shows."""
    from .registry import get_toy, toy_names

    for name in toy_names():
        console.print(f"[bold]{name}[/bold]: {get_toy(name).description}", highlight=False)


@toy_app.command("train")
@_user_errors
def toy_train(
    name: str = typer.Argument(..., help="Which toy (see `mechscope toy list`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory (written atomically; the last "
                                                      "complete checkpoint survives an interrupt)."),
    sets: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (repeatable), e.g. --set p=97."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (the config's `steps`)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (the config's `seed`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    device: Optional[str] = _device_option(),
) -> None:
    """Train a toy with its paper's defaults (override with --set) and save it to --out."""
    from ..devices import resolve_device
    from .registry import get_toy, parse_overrides
    from .training import ToyError

    toy = get_toy(name)
    extra = [*sets, *([f"steps={steps}"] if steps is not None else []), *([f"seed={seed}"] if seed is not None else [])]
    config = parse_overrides(toy.config, extra)
    if out.exists() and not resume and any(out.iterdir()):
        raise ToyError(f"{out} exists and is not empty; pass --resume to continue it or choose another --out")
    trained = toy.train(config, out=out, device=resolve_device(device), resume=resume)
    summary = getattr(trained, "summary", None)
    if summary:
        for key, value in summary.items():
            console.print(f"{key}: {value}", highlight=False)
    err_console.print(f"saved {name} to {out}", highlight=False)


@toy_app.command("analyze")
@_user_errors
def toy_analyze(
    name: str = typer.Argument(..., help="Which toy (see `mechscope toy list`)."),
    model: Path = typer.Option(..., "--model", "-m", help="A checkpoint directory written by `mechscope toy train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.html, analysis.json, figures)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Analyse a trained toy's mechanism and write a report."""
    import json

    from ..devices import resolve_device
    from ..report.write import write_sections
    from .registry import get_toy

    toy = get_toy(name)
    trained = toy.load(model, device=resolve_device(device))
    analysis = toy.analyze(trained)
    files = {"analysis.json": lambda p: p.write_text(json.dumps(analysis.summary, indent=1)), **analysis.files()}
    write_sections(out, f"mechscope toy: {name}", analysis.sections(), files, overwrite=overwrite)
    for key, value in analysis.summary.items():
        if not isinstance(value, (list, dict)):
            console.print(f"{key}: {value}", highlight=False)
    err_console.print(f"wrote {out / 'report.html'}", highlight=False)
