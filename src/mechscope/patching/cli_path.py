"""`mechscope patch path` and `mechscope patch dla`: path patching and direct logit attribution from
the command line, each writing a report directory (result file, PNG heatmap, report.html).

`register(patch_app)` adds both commands to the `patch` sub-app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _data_option, _device_option, _model_option, _task_option, _user_errors
from ..errors import ParameterError


def _common_checks(task, data_file, n: int, batch_size, out: Path, overwrite: bool) -> None:
    from ..cli_common import _check_batch_size
    from ..report import check_output_dir

    if n < 1:
        raise ParameterError(f"--n must be at least 1, got {n}")
    _check_batch_size(batch_size)
    check_output_dir(out, overwrite)


def path_command(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    n: int = typer.Option(16, "--n", help="Examples (generated with --task, the first N of --data)."),
    seed: int = typer.Option(0, help="Seed of the task generator."),
    senders: Optional[str] = typer.Option(None, "--senders", help="Comma-separated senders, all patched at once: "
                                          "embed, a9.h6, a9 (a layer's heads), m9, blocks.9.attn.hook_z[6] ..."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="heads | mlps: each head (MLP) alone as the sender, "
                                        "a [layer, head] map."),
    receivers: str = typer.Option("logits", "--receivers", help="Comma-separated receivers: logits, a11.h3.q, "
                                  "a11.h3.k, a11.g1.v (key-value group), m11.in ..."),
    ablation: str = typer.Option("counterfactual", help="What senders carry: counterfactual | mean | zero."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per forward pass."),
    out: Path = typer.Option(..., "--out", "-o", help="New output directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report in --out."),
) -> None:
    """Path patching: the normalised effect (noising) of the paths from the senders to the receivers."""
    from ..attribution.references import check_ablation
    from ..cli_common import _task_or_data, console
    from ..graph import Graph
    from ..report import write_sections
    from ..report.sections import dla as heat
    from .names import parse_receivers, parse_senders
    from .path import SWEEP_KINDS, path_patch_sets, path_patch_sweep

    if (senders is None) == (sweep is None):
        raise ParameterError("give either --senders or --sweep")
    if sweep is not None and sweep not in SWEEP_KINDS:
        raise ParameterError(f"unknown sweep '{sweep}'; choose one of {', '.join(SWEEP_KINDS)}")
    check_ablation(ablation)
    # The names' forms are checked before the model loads, their layers and heads once it has.
    if senders is not None and not parse_senders(senders, None):
        raise ParameterError("--senders names no sender")
    parse_receivers(receivers, None)
    _common_checks(task, data_file, n, batch_size, out, overwrite)
    bridge, dataset = _task_or_data(task, data_file, model, n, seed, n_data=n, device=device)
    graph = Graph.from_model(bridge)
    rs = parse_receivers(receivers, graph)
    if sweep is not None:
        result = path_patch_sweep(bridge, dataset, rs, sweep, ablation, batch_size=batch_size)
        grid, top = result.grid, result.top(12)
    else:
        result = path_patch_sets(bridge, dataset, [parse_senders(senders, graph)], rs, ablation, batch_size=batch_size)
        grid, top = None, result.top(1)
    what = f"senders {sweep or senders} -> receivers {','.join(result.receivers)} ({ablation})"
    note = ("Normalised path-patching effect, noising: (M(x) - M_patched) / (M(x) - M(x')); 0 = no effect, "
            f"1 = the whole counterfactual effect. {what}; {len(dataset)} examples of {dataset.task}, "
            f"metric {result.metric}: clean {float(result.metric_clean.mean()):.3f}, counterfactual "
            f"{float(result.metric_counterfactual.mean()):.3f}.")
    files = {"path_patching.safetensors": result.save}
    if grid is not None:
        files["path_patching.png"] = lambda p: heat.heatmap_png(grid, f"path patching: {what}", p, "effect")
        sections = [heat.section("path-patching", "Path patching", grid, top, note)]
    else:
        sections = [heat.section("path-patching", "Path patching", result.effect, top, note)]
    write_sections(out, f"Path patching — {model}", sections, files, overwrite=overwrite)
    for label, value in top:
        console.print(f"{label}: {value:.4f}", highlight=False)
    console.print(f"wrote {out}/report.html, " + ", ".join(files))


def dla_command(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    n: int = typer.Option(16, "--n", help="Examples (generated with --task, the first N of --data)."),
    seed: int = typer.Option(0, help="Seed of the task generator."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per forward pass."),
    out: Path = typer.Option(..., "--out", "-o", help="New output directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report in --out."),
) -> None:
    """Direct logit attribution of the logit difference (correct - wrong) to every head, MLP and the
    embedding, with the final norm's scale frozen at its clean value."""
    from ..cli_common import _task_or_data, console
    from ..report import write_sections
    from ..report.sections import dla as heat
    from .dla import check_dla_supported, direct_logit_attribution

    _common_checks(task, data_file, n, batch_size, out, overwrite)
    bridge, dataset = _task_or_data(task, data_file, model, n, seed, n_data=n, device=device)
    check_dla_supported(bridge)
    result = direct_logit_attribution(bridge, dataset, batch_size=batch_size)
    grid, top = result.head_map(), result.top(12)
    residual = float((result.last.sum(1) - result.logit_diff).abs().max())
    note = (f"Direct logit attribution at the last position, mean over {len(dataset)} examples of {dataset.task}: "
            f"mean logit difference {float(result.logit_diff.mean()):.3f}; the terms sum to it within "
            f"{residual:.2g}. MLP terms by layer: " + ", ".join(f"{v:.2f}" for v in result.mlp_terms().tolist()))
    files = {"dla.safetensors": result.save,
             "dla.png": lambda p: heat.heatmap_png(grid, f"direct logit attribution, {dataset.task}", p, "logit diff")}
    section = heat.section("dla", "Direct logit attribution (heads)", grid, top, note,
                           extra={"mlp": result.mlp_terms().tolist()})
    write_sections(out, f"Direct logit attribution — {model}", [section], files, overwrite=overwrite)
    for label, value in top:
        console.print(f"{label}: {value:.4f}", highlight=False)
    console.print(f"wrote {out}/report.html, dla.safetensors, dla.png")


def register(patch_app: typer.Typer) -> None:
    """Add `path` and `dla` to the `mechscope patch` sub-app."""
    patch_app.command("path")(_user_errors(path_command))
    patch_app.command("dla")(_user_errors(dla_command))
