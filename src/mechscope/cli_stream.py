"""`mechscope attribute` and `mechscope evaluate`: edge scores, or one circuit's faithfulness, over a
whole dataset in one pass, which may be streamed from disk (`--data F.jsonl --stream`, or a file
above `streaming.STREAM_ABOVE`) and may run on a model spread over devices (`--device-map auto`).

Both write their one output file atomically after the last batch: an error on any row (named by file,
line and field) or an interruption leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import (_batch_option, _check_batch_size, _data_option, _device_map_option, _device_option,
                         _model_option, _stream_option, _task_option, _task_or_data, _user_errors, console,
                         data_parallel, writes_results)


def _load(task, data_file, model, n, seed, device, device_map, stream, batch_size, out):
    """Check the options every verb here shares (before any model work), then (model, dataset)."""
    from .errors import ParameterError
    from .fileio import check_writable_file

    if device is not None and device_map is not None:
        raise ParameterError("give either --device or --device-map, not both")
    _check_batch_size(batch_size)
    check_writable_file(out)
    return _task_or_data(task, data_file, model, n or 64, seed, n_data=n, device=device, device_map=device_map,
                         stream=stream)


@_user_errors
@data_parallel
def attribute_command(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    device_map: Optional[str] = _device_map_option(),
    stream: Optional[bool] = _stream_option(),
    method: str = typer.Option("eap", help="eap | eap-ig | peap | exact"),
    n: Optional[int] = typer.Option(None, "--n", "--examples",
                                    help="Examples: generated with --task (default 64), the first N of --data."),
    seed: int = typer.Option(0, help="Seed of the task generator."),
    steps: int = typer.Option(5, help="Interpolation steps of eap-ig."),
    aggregation: str = typer.Option("sum", help="peap: sum | avg | max_abs | pooled_mean | signed_max"),
    batch_size: Optional[int] = _batch_option(),
    out: Path = typer.Option(..., "--out", "-o", help="Output scores file (.safetensors)."),
) -> None:
    """Score every edge of the model's graph on a dataset and save the scores (safetensors)."""
    from .attribution import attribute, check_method
    from .attribution.aggregation import check_aggregation
    check_method(method, steps)
    check_aggregation(aggregation, method)
    bridge, dataset = _load(task, data_file, model, n, seed, device, device_map, stream, batch_size, out)
    scores = attribute(bridge, dataset, method, steps=steps, batch_size=batch_size, aggregation=aggregation)
    if not writes_results():  # torchrun: rank 0 writes the all-reduced scores
        return
    scores.save(out)
    console.print(f"{method} scores of {scores.graph.n_edges:,} edges on {scores.n_examples} examples"
                  f"{' (streamed)' if _streamed(dataset) else ''}; wrote {out}")


@_user_errors
@data_parallel
def evaluate_command(
    circuit_file: Path = typer.Argument(..., help="A circuit JSON (circuit.json of a report, or a saved circuit)."),
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    device_map: Optional[str] = _device_map_option(),
    stream: Optional[bool] = _stream_option(),
    n: Optional[int] = typer.Option(None, "--n", "--examples",
                                    help="Examples: generated with --task (default 64), the first N of --data."),
    seed: int = typer.Option(0, help="Seed of the task generator."),
    ablation: str = typer.Option("counterfactual", help="counterfactual | mean | zero"),
    batch_size: Optional[int] = _batch_option(),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSON file with the faithfulness."),
) -> None:
    """Faithfulness (soft, hard, normalized) of a saved circuit on a dataset, written as JSON."""
    from .attribution.references import check_ablation
    from .circuits.evaluation import evaluate
    from .circuits.span_circuit import load_any_circuit
    from .fileio import write_json

    check_ablation(ablation)
    circuit = load_any_circuit(circuit_file)
    bridge, dataset = _load(task, data_file, model, n, seed, device, device_map, stream, batch_size, out)
    result = evaluate(bridge, circuit, dataset, ablation=ablation, batch_size=batch_size)
    if not writes_results():
        return
    write_json(out, {"circuit": str(circuit_file), "task": dataset.task, "model": dataset.model or model,
                     "ablation": ablation, "streamed": _streamed(dataset), **result.to_dict()})
    console.print(f"normalized faithfulness {result.normalized:.3f} (soft {result.soft:.3f}, hard {result.hard:.3f}) "
                  f"on {result.n_examples} examples; wrote {out}")


def _streamed(dataset) -> bool:
    from .data.streaming import StreamingDataset

    return isinstance(dataset, StreamingDataset)
