"""`mechscope patch sweep`: an activation patching sweep (and, with --estimate, its attribution-patching
estimate) written as a report directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import (_data_option, _device_option, _model_option, _task_option, _user_errors, data_parallel,
                          writes_results)

patch_app = typer.Typer(no_args_is_help=True, help="Patching: activation patching sweeps, path patching, direct logit attribution.")


def _ints(text: Optional[str], what: str) -> Optional[list[int]]:
    from ..errors import ParameterError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ParameterError(f"--{what} must be comma-separated integers, got '{text}'") from None


@patch_app.command("sweep")
def sweep_command(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    component: str = typer.Option("z_pos", help="resid_pre, resid_post, attn_out, mlp_out, z, z_pos, q, k, v, pattern."),
    direction: str = typer.Option("noising", help="noising or denoising."),
    reference: str = typer.Option("counterfactual", help="counterfactual, mean, zero or resample (noising)."),
    positions: str = typer.Option("span", help="span (the schema's spans) or token (examples of one length)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default: all)."),
    n: Optional[int] = typer.Option(None, "--n", "--examples", help="Examples (generated for --task, default 16; the first N of "
                                    "--data, default all)."),
    seed: int = typer.Option(0, help="Seed of the task generator and of the resample permutation."),
    estimate: bool = typer.Option(False, "--estimate", help="Also compute the attribution-patching estimate."),
    batch_size: int = typer.Option(16, help="Examples per batch."),
    patch_batch: int = typer.Option(256, help="Patches per forward pass."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the result, heatmap and report."),
    device: Optional[str] = _device_option(),
) -> None:
    """Patch every instance of one component kind in every example and write DIR/result.safetensors
    (+ result.json), heatmap.png and report.html (and estimate.safetensors, estimate.png with --estimate)."""
    _user_errors(_sweep)(task, data_file, model, component, direction, reference, positions, layers, heads, n, seed,
                         estimate, batch_size, patch_batch, out, device)


@data_parallel
def _sweep(task, data_file, model, component, direction, reference, positions, layers, heads, n, seed, estimate,
           batch_size, patch_batch, out, device) -> None:
    from ..cli_common import _task_or_data, console
    from ..errors import check_count
    from ..fileio import write_json
    from ..report import check_output_dir, write_sections
    from ..report.sections.patching import heatmap_png, section
    from .attribution_patching import attribution_sweep, spearman
    from .sweep import COMPONENTS, DIRECTIONS, POSITIONS, REFERENCES, _choice, check_sweep
    from .sweep import patch_sweep

    _choice("component", component, COMPONENTS)
    _choice("direction", direction, DIRECTIONS)
    _choice("reference", reference, REFERENCES)
    _choice("positions", positions, POSITIONS)
    layer_list, head_list = _ints(layers, "layers"), _ints(heads, "heads")
    if n is not None:
        check_count("--n", n)
    check_count("--batch-size", batch_size)
    check_count("--patch-batch", patch_batch)
    check_output_dir(out, False)
    bridge, dataset = _task_or_data(task, data_file, model, n or 16, seed, n_data=n, device=device)
    check_sweep(bridge, dataset, component, direction, reference, positions, layer_list, head_list)
    args = dict(component=component, direction=direction, reference=reference, positions=positions,
                layers=layer_list, heads=head_list, batch_size=batch_size, seed=seed)
    result = patch_sweep(bridge, dataset, patch_batch=patch_batch, **args)
    result.meta["model"] = model
    files = {"result.safetensors": result.save, "heatmap.png": lambda p: heatmap_png(result, p)}
    summary = {**result.meta, "axes": list(result.axes), "metric_clean": float(result.metric_clean.mean()),
               "metric_counterfactual": float(result.metric_counterfactual.mean())}
    if estimate:
        est = attribution_sweep(bridge, dataset, **args)
        est.meta["model"] = model
        summary["spearman_exact_estimate"] = spearman(result.values, est.values)
        summary["spearman_exact_estimate_mean"] = spearman(result.mean, est.mean)
        files.update({"estimate.safetensors": est.save, "estimate.png": lambda p: heatmap_png(est, p)})
    if not writes_results():  # under torchrun: every rank patched its shard; rank 0 writes
        return
    files["result.json"] = lambda p: write_json(p, summary)
    title = f"Activation patching: {component} ({direction})"
    write_sections(out, title, [section(result)], files, subtitle=f"{model} · {dataset.task} · {len(dataset)} examples")
    line = f"wrote {out}: {tuple(result.values.shape)} values, mean effect range [{float(result.mean.min()):.3f}, " \
           f"{float(result.mean.max()):.3f}]"
    if estimate:
        line += f"; spearman(exact, estimate) {summary['spearman_exact_estimate']:.3f}"
    console.print(line)


from .cli_path import register  # noqa: E402  (path and dla join the sweep under `mechscope patch`)

register(patch_app)
