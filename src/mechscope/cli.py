"""`mechscope <verb>`: a thin command-line layer over the library.

Errors a user can cause (`MechscopeError`) are printed on one line and exit with status 2; warnings
about results (`MechscopeWarning`) are printed as `warning:` lines at the end of the command.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m mechscope.cli`: run the one `mechscope.cli` module, which registers the verb groups,
    # not a second copy of it named __main__.
    import sys

    from mechscope.cli import main

    sys.exit(main())

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_common import (Terminated, _batch_option, _check_batch_size, _data_option, _device_option,
                         _model_option, _task_option, _task_or_data, _user_errors, console, data_parallel,
                         err_console, writes_results)

__all__ = ["Terminated", "app", "main"]  # Terminated: SIGTERM as an exception, for callers of main()

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mechanistic interpretability workbench.")

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
QUERY_EDGES_HELP = ("peap's query edges: per_key (the PEAP paper's: a query in its score against one key) | "
                    "whole_row (a query in all its scores at once).")


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
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    prompt: str = typer.Option(IOI_PROMPT, help="Prompt whose next token to predict."),
    top_k: int = typer.Option(5, help="How many candidate next tokens to show."),
) -> None:
    """Load a model, print its summary and its top next-token predictions on a prompt."""
    import torch

    from .models import load_model, model_summary

    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
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


def _print_summary(title: str, summary: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
@_user_errors
def data(
    task: Optional[str] = typer.Argument(None, help="Built-in task: ioi, greater-than, winobias, induction."),
    model: str = _model_option("Model whose tokenizer and behaviour to use."),
    device: Optional[str] = _device_option(),
    n: int = typer.Option(200, "--n", help="Number of examples to generate."),
    seed: int = typer.Option(0, help="Random seed of the generator."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL file."),
    from_csv: Optional[Path] = typer.Option(None, "--from-csv", help="Clean prompts in the PEAP CSV format."),
    from_jsonl: Optional[Path] = typer.Option(
        None, "--from-jsonl", help="Prompt pairs as text: one JSON object per line with clean, counterfactual, "
        "correct, wrong (see docs: 'Datasets: the formats')."
    ),
    metric: str = typer.Option("logit_diff", help="Metric of a --from-jsonl dataset: logit_diff | prob_diff | kl | accuracy."),
    counterfactual: Optional[Path] = typer.Option(None, "--counterfactual", help="Counterfactual PEAP CSV."),
    swap_pronouns: bool = typer.Option(
        False, "--swap-pronouns", help="With --from-csv and no --counterfactual: swap he/she to make one."
    ),
    only_correct: bool = typer.Option(False, "--only-correct", help="Keep only examples the model gets right."),
    batch_size: Optional[int] = _batch_option(),
) -> None:
    """Build a prompt-pair dataset (a built-in task, peer CSVs or a text JSONL), report the model's
    behaviour, save it as a tokenized dataset JSONL."""
    from .behaviour import keep_correct, measure_behaviour
    from .data.dataset import METRICS, DatasetError
    from .fileio import check_writable_file
    from .models import load_model
    from .tasks import TASKS

    if sum(x is not None for x in (task, from_csv, from_jsonl)) != 1:
        raise DatasetError("give one of a TASK, --from-csv (with --counterfactual) or --from-jsonl")
    if from_csv is not None and (counterfactual is None) == (not swap_pronouns):
        raise DatasetError("--from-csv needs one of --counterfactual FILE (row-aligned) or --swap-pronouns")
    if metric not in METRICS:
        raise DatasetError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if task is not None and task not in TASKS:
        raise DatasetError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if task is not None and n < 1:
        raise DatasetError(f"--n must be at least 1, got {n}")
    _check_batch_size(batch_size)
    check_writable_file(out)
    rows = None
    if from_jsonl is not None:
        from .data.text_jsonl import read_text_jsonl

        rows = read_text_jsonl(from_jsonl)  # before the model loads: structure errors come first
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    if task is not None:
        from .tasks import make_task

        dataset = make_task(task, bridge.tokenizer, n, seed=seed)
    elif rows is not None:
        from .data.text_jsonl import text_dataset

        dataset = text_dataset(rows, bridge.tokenizer, from_jsonl, n_ctx=bridge.cfg.n_ctx, metric=metric)
        console.print(f"read {len(dataset)} prompt pairs from {from_jsonl}; schema: "
                      + " | ".join(dataset.schema.spans), highlight=False, soft_wrap=True)
    else:
        from .data.peap_csv import load_peap_csv

        dataset, report = load_peap_csv(
            from_csv, counterfactual, bridge.tokenizer, n_ctx=bridge.cfg.n_ctx,
            counterfactual_rule="swap-pronouns" if swap_pronouns else None,
        )
        console.print(
            f"read {report.rows_read} rows from {from_csv}, kept {report.rows_kept} (span indices: {report.mode})"
        )
        for line in report.summary():
            console.print(f"  {line}", highlight=False, markup=False)
        for row, reason in report.excluded[:5]:
            console.print(f"  excluded row {row}: {reason}", highlight=False, markup=False)
    dataset.model = model
    behaviour = measure_behaviour(bridge, dataset, batch_size)
    _print_summary(f"{dataset.task} on {model}", {"task": dataset.task, **behaviour.summary(dataset.metric)})
    if only_correct:
        dataset = keep_correct(dataset, behaviour)
        console.print(f"kept {len(dataset)} examples the model gets right")
    dataset.save(out)
    console.print(f"wrote {len(dataset)} examples to {out}")


@app.command()
@_user_errors
@data_parallel
def curves(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    methods: str = typer.Option("eap,eap-ig", help="Comma-separated attribution methods."),
    n: int = typer.Option(200, "--n", "--examples", help="Examples to generate (with --task)."),
    seed: int = typer.Option(0),
    ablation: str = typer.Option("counterfactual", help="counterfactual | mean | zero"),
    steps: int = typer.Option(5, help="Interpolation steps of eap-ig."),
    batch_size: Optional[int] = _batch_option(),
    selection: str = typer.Option("top_n", help="Circuit selection: top_n | greedy (grown from the logits)."),
    fractions: Optional[str] = typer.Option(None, help="Comma-separated circuit sizes as fractions of all edges."),
    query_edges: str = typer.Option("per_key", "--query-edges", help=QUERY_EDGES_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSON file with the curves."),
) -> None:
    """Score edges on a discovery half, evaluate faithfulness curves (CPR, CMD) on the held-out half.

    With --methods peap,eap the position-aware circuits (over the task's schema) and the
    non-positional ones are compared on concrete token-level edge counts."""
    from .attribution import ALL_METHODS, check_method
    from .attribution.peap import check_query_edges
    from .attribution.references import ABLATIONS
    from .data.dataset import DatasetError
    from .circuits.discovery import compare_methods
    from .circuits.evaluation import DEFAULT_FRACTIONS, check_fractions, check_selection
    from .errors import ParameterError
    from .fileio import check_writable_file, write_json

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in ALL_METHODS]
    if not chosen or unknown:
        raise DatasetError(f"unknown method in --methods '{methods}'; choose from {', '.join(ALL_METHODS)}")
    if ablation not in ABLATIONS:
        raise DatasetError(f"unknown ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}")
    check_selection(selection)
    try:
        sizes = DEFAULT_FRACTIONS if fractions is None else tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise DatasetError(f"--fractions must be comma-separated numbers, got '{fractions}'") from None
    try:
        check_fractions(sizes)  # the check compare_methods makes, here before the model loads
    except ParameterError:
        raise DatasetError("--fractions must be increasing numbers in (0, 1]") from None
    if task is not None and n < 2:
        raise DatasetError(f"--n must be at least 2 (a discovery and an evaluation half), got {n}")
    check_query_edges(query_edges)
    for method in chosen:
        check_method(method, steps, ablation, query_edges if method == "peap" else "per_key")
    _check_batch_size(batch_size)
    check_writable_file(out)
    bridge, dataset = _task_or_data(task, data_file, model, n, seed, device=device)
    summary, _ = compare_methods(bridge, dataset, chosen, seed=seed, ablation=ablation, steps=steps,
                                 batch_size=batch_size, selection=selection, fractions=sizes, query_edges=query_edges)
    if not writes_results():
        return
    write_json(out, summary)
    _print_summary("behaviour", summary["behaviour"])
    table = Table(title=f"normalized faithfulness on {summary['n_evaluation']} held-out examples")
    table.add_column("method")
    first = next(iter(summary["methods"].values()))
    for p in first["points"]:
        table.add_column(f"{100 * p['fraction']:g}%")
    table.add_column("CPR")
    table.add_column("CMD")
    for name, c in summary["methods"].items():
        table.add_row(name, *[f"{p['normalized']:.2f}" for p in c["points"]], f"{c['cpr']:.3f}", f"{c['cmd']:.3f}")
    console.print(table)
    sizes_table = Table(title="concrete token-level edges (mean per held-out example)")
    sizes_table.add_column("method")
    for p in first["points"]:
        sizes_table.add_column(f"{100 * p['fraction']:g}%")
    targets = list(first.get("concrete_edges_for", {}))
    for t in targets:
        sizes_table.add_column(f"edges for f>={t}")
    for name, c in summary["methods"].items():
        reach = [c["concrete_edges_for"][t] for t in targets]
        sizes_table.add_row(name, *[f"{p['concrete_edges']:,.0f}" for p in c["points"]],
                            *["never" if r is None else f"{r:,.0f}" for r in reach])
    console.print(sizes_table)
    console.print(f"wrote {out}")


@app.command()
@_user_errors
@data_parallel
def circuit(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    method: str = typer.Option("peap", help="peap (position-aware, with the EAP baseline) | eap | eap-ig"),
    n: Optional[int] = typer.Option(None, "--n", "--examples", help="Examples (--examples under torchrun, whose parser takes --n for its own): generated with --task (default 120), the first N of --data."),
    seed: int = typer.Option(0, help="Seed of the task generator and of the discovery / evaluation split."),
    selection: str = typer.Option("greedy", help="Circuit selection: greedy (from the logits) | top_n."),
    batch_size: Optional[int] = _batch_option(),
    query_edges: str = typer.Option("per_key", "--query-edges", help=QUERY_EDGES_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="New output directory (report.html, summary.json, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report in --out (once the new one is complete)."),
) -> None:
    """Find a circuit and write a self-contained HTML report with its faithfulness curves, its graph, its
    top edges and attention patterns, plus summary.json, scores.safetensors, circuit.json and PNGs."""
    from .data.dataset import DatasetError
    from .attribution.peap import check_query_edges
    from .circuits.discovery import discover_circuit
    from .report import check_output_dir, write_report

    if method not in ("peap", "eap", "eap-ig"):
        raise DatasetError(f"unknown method '{method}'; choose peap, eap or eap-ig")
    if selection not in ("greedy", "top_n"):
        raise DatasetError(f"unknown selection '{selection}'; choose greedy or top_n")
    if n is not None and n < 2:
        raise DatasetError("--n must be at least 2 (a discovery and an evaluation half)")
    check_query_edges(query_edges)
    _check_batch_size(batch_size)
    check_output_dir(out, overwrite)
    bridge, dataset = _task_or_data(task, data_file, model, n or 120, seed, n_data=n, device=device)
    # Under torchrun every rank runs the discovery (attribution and evaluation shard the examples);
    # rank 0 alone writes the report and prints, the others write nothing.
    run = discover_circuit(bridge, dataset, method, seed=seed, selection=selection, batch_size=batch_size,
                           query_edges=query_edges)
    if not writes_results():
        return
    with err_console.status("writing the report"):
        write_report(out, bridge, run, overwrite=overwrite)
    s = run.summary
    table = Table(title=f"{method} circuit for {s['task']} on {s['model'] or model}: held-out faithfulness")
    for col in ("method", "fraction", "span edges", "concrete edges", "normalized", "soft", "hard"):
        table.add_column(col)
    for m, curve in s["methods"].items():
        for p in curve["points"]:
            table.add_row(m, f"{100 * p['fraction']:g}%", f"{p['edges']:,}", f"{p['concrete_edges']:,.0f}",
                          f"{p['normalized']:.2f}", f"{p['soft']:.2f}", f"{p['hard']:.2f}")
    console.print(table)
    c = s["circuit"]
    console.print(
        f"model accuracy {s['model_accuracy']:.2f}, metric clean {s['metric_clean']:.3f}, all-ablated "
        f"{s['metric_ablated']:.3f}; saved circuit: {c['n_edges']:,} span edges, {c['concrete_edges']:,.0f} "
        f"concrete edges, normalized faithfulness {c['normalized']:.2f}"
    )
    sig = s["signal"]
    console.print(f"M(model) - M(all ablated) = {sig['gap']:.3f} ± {sig['gap_se']:.3f} (standard error over "
                  f"{s['n_evaluation']} held-out examples)" + ("; too small: see the warning" if sig["weak"] else ""))
    console.print(f"wrote {out}/report.html (open it in a browser), summary.json, scores.safetensors, circuit.json, "
                  "edges.csv, curves.png, circuit.png, circuit.svg")


@app.command()
@_user_errors
def schema(
    data_file: Path = typer.Argument(..., help="Dataset JSONL (its schema, if any, is replaced)."),
    model: str = _model_option("Model for saliency and tokenizer."),
    device: Optional[str] = _device_option(),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL with the induced schema."),
    method: str = typer.Option("induce", help="induce (alignment + saliency, offline) | llm (OpenAI-compatible endpoint)"),
    saliency: str = typer.Option("input_x_gradient", help="input_x_gradient | integrated_gradients | none"),
    show: int = typer.Option(3, help="How many examples to print with their spans marked."),
    batch_size: Optional[int] = _batch_option(),
) -> None:
    """Give a dataset a schema of named spans, induced from the data and the model's token saliency
    (or proposed by an LLM); prints the schema, examples with spans marked and `valid_fraction=`."""
    from .data.dataset import DatasetError, PromptPairDataset
    from .fileio import check_writable_file
    from .models import load_model
    from .schemas.saliency import token_saliency
    from .schemas.induction import mark_spans

    if method not in ("induce", "llm"):
        raise DatasetError(f"unknown method '{method}'; choose induce or llm")
    if saliency not in ("input_x_gradient", "integrated_gradients", "none"):
        raise DatasetError(f"unknown saliency '{saliency}'; choose input_x_gradient, integrated_gradients or none")
    _check_batch_size(batch_size)
    check_writable_file(out)
    dataset = PromptPairDataset.load(data_file)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    sal = None if saliency == "none" else token_saliency(bridge, dataset, saliency, batch_size=batch_size)
    if method == "induce":
        from .schemas.induction import induce_schema

        result, report = induce_schema(dataset, bridge.tokenizer, sal)
    else:
        from .schemas.llm import LLMClient, llm_schema

        result, report = llm_schema(dataset, bridge.tokenizer, sal, LLMClient.from_env())
    console.print(f"schema ({len(report.schema)} spans): " + " | ".join(report.schema.spans), highlight=False)
    for ex in result.examples[:show]:
        console.print("  " + mark_spans(ex, result.schema, bridge.tokenizer), highlight=False, markup=False)
    for i, reason in report.excluded[:5]:
        console.print(f"  excluded example {i}: {reason}", highlight=False, markup=False)
    if len(report.excluded) > 5:
        console.print(f"  ... and {len(report.excluded) - 5} more excluded")
    if len(result):
        result.save(out)
        console.print(f"wrote {len(result)} of {len(dataset)} examples to {out}")
    print(f"valid_fraction={report.valid_fraction:.4f}")


@app.command("export")
@_user_errors
def export_command(
    circuit_file: Path = typer.Argument(..., help="A circuit JSON (circuit.json of a report, or a saved circuit)."),
    to: str = typer.Option(..., "--to", help="eapig (EAP-IG's graph JSON; non-positional circuits) | dot "
                           "(graphviz) | graphml | csv (the circuit's edge table)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file."),
    scores_file: Optional[Path] = typer.Option(None, "--scores", help="Edge scores (.safetensors) to label the "
                                               "edges with (default: the scores saved in the circuit, if any)."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="The model's width, written into EAP-IG's cfg "
                                          "(its loader needs it)."),
) -> None:
    """Write a circuit for other tools: EAP-IG's graph JSON, graphviz DOT, GraphML or a CSV edge table."""
    from .attribution.scores import EdgeScores
    from .circuits.exports import EXPORT_FORMATS, check_export, export_circuit
    from .circuits.span_circuit import load_any_circuit
    from .errors import ParameterError, check_count
    from .fileio import check_writable_file

    if to not in EXPORT_FORMATS:
        raise ParameterError(f"unknown export format '{to}'; choose one of {', '.join(EXPORT_FORMATS)}")
    if d_model is not None:
        check_count("--d-model", d_model)
    check_writable_file(out)
    circuit = load_any_circuit(circuit_file)
    check_export(circuit, to)
    scores = EdgeScores.load(scores_file) if scores_file is not None else None
    export_circuit(circuit, to, out, scores, d_model)
    console.print(f"wrote {out} ({to}: {circuit.n_edges:,} edges of the {circuit.method or 'circuit'} circuit)")


@app.command("acdc")
@_user_errors
def acdc_command(
    task: Optional[str] = _task_option(),
    data_file: Optional[Path] = _data_option(),
    model: str = _model_option(),
    device: Optional[str] = _device_option(),
    n: Optional[int] = typer.Option(None, "--n", help="Examples: generated with --task (default 32), the first N of --data."),
    seed: int = typer.Option(0, help="Seed of the task generator."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Threshold: an edge whose ablation changes the metric by "
                                        "at most tau stays ablated."),
    taus: Optional[str] = typer.Option(None, "--taus", help="Comma-separated thresholds: one circuit each, and a "
                                       "faithfulness curve."),
    metric: str = typer.Option("kl", help="kl (KL divergence to the model, signed change) | task (the dataset's "
                               "metric, |change|) | a metric name."),
    ablation: str = typer.Option("counterfactual", help="counterfactual | mean | zero"),
    last_layers: Optional[int] = typer.Option(None, "--last-layers", help="Test only the edges into the logits and "
                                              "into the last K layers' inputs (the rest stays in the circuit)."),
    batch_size: Optional[int] = _batch_option(),
    out: Path = typer.Option(..., "--out", "-o", help="New directory: a circuit JSON per tau, summary.json, "
                             "scores.json (and curve.json for a sweep)."),
) -> None:
    """ACDC (Conmy et al. 2023): prune edges from the logits backwards, keeping an edge only when
    ablating it changes the metric by more than tau; one run over the examples per edge tested."""
    from .attribution.references import check_ablation
    from .circuits.acdc import acdc, check_acdc_metric, check_acdc_out, check_taus
    from .circuits.acdc import last_layers as last_layer_edges
    from .data.dataset import DatasetError
    from .errors import ParameterError, check_count
    from .graph import Graph

    if (tau is None) == (taus is None):
        raise ParameterError("give one of --tau or --taus")
    if taus is not None:
        try:
            values = [float(t) for t in taus.split(",") if t.strip()]
        except ValueError:
            raise ParameterError(f"--taus must be comma-separated numbers, got '{taus}'") from None
    else:
        values = [tau]
    values = check_taus(values)
    check_acdc_metric(metric)
    check_ablation(ablation)
    if n is not None and n < 1:
        raise DatasetError(f"--n must be at least 1, got {n}")
    if last_layers is not None:
        check_count("--last-layers", last_layers, minimum=0)
    _check_batch_size(batch_size)
    check_acdc_out(out)
    bridge, dataset = _task_or_data(task, data_file, model, n or 32, seed, n_data=n, device=device)
    graph = Graph.from_model(bridge)
    candidates = None if last_layers is None else last_layer_edges(graph, last_layers)
    result = acdc(bridge, dataset, values, metric=metric, ablation=ablation, batch_size=batch_size,
                  candidates=candidates)
    result.save(out)
    table = Table(title=f"ACDC on {len(dataset)} examples ({result.metric}, {ablation} ablation; "
                        f"{result.max_forwards:,} of {graph.n_edges:,} edges testable)")
    for col in ("tau", "edges kept", "edges tested", "seconds", "normalized", "soft", "hard"):
        table.add_column(col)
    for run in result.summary()["runs"]:
        table.add_row(f"{run['tau']:g}", f"{run['n_edges']:,}", f"{run['edges_tested']:,}", f"{run['seconds']:.1f}",
                      f"{run['normalized']:.3f}", f"{run['soft']:.3f}", f"{run['hard']:.2f}")
    console.print(table)
    if len(values) > 1:
        console.print(f"CPR {result.curve.cpr:.3f}, CMD {result.curve.cmd:.3f} over the fractions the sweep reached")
    console.print(f"wrote {out}/summary.json, scores.json" + (", curve.json" if len(values) > 1 else "")
                  + f" and {len(values)} circuit file(s)")


@app.command()
@_user_errors
def figure(
    circuit_file: Path = typer.Argument(..., help="A circuit JSON (circuit.json of a report, or a saved circuit)."),
    out: Path = typer.Option(..., "--out", "-o", help="The figure: a path ending in .svg, .pdf or .png."),
    scores_file: Optional[Path] = typer.Option(None, "--scores", help="Scores of the circuit's graph "
                                                "(scores.safetensors): edge colours, widths and the concrete size."),
    aggregate: str = typer.Option("auto", help="none (every head) | layers (a layer's heads merged per span) | "
                                  "auto (layers above --max-edges edges)."),
    max_edges: int = typer.Option(400, "--max-edges", help="Draw at most this many edges, the largest by |score|."),
    title: Optional[str] = typer.Option(None, help="A title over the figure."),
) -> None:
    """Draw a circuit as a static figure for a paper: span columns, layers from the input to the logits,
    labelled nodes, a legend and a caption with its size (SVG keeps text as text; PDF embeds fonts)."""
    from .attribution.scores import EdgeScores
    from .circuits.span_circuit import load_any_circuit
    from .errors import check_count
    from .report.circuit_figure import as_span_circuit, check_aggregate, check_figure_path, check_scores_fit
    from .report.circuit_figure import circuit_figure as draw_figure

    check_figure_path(out)
    check_aggregate(aggregate)
    check_count("--max-edges", max_edges)
    circuit = as_span_circuit(load_any_circuit(circuit_file))
    scores = EdgeScores.load(scores_file) if scores_file is not None else None
    check_scores_fit(circuit, scores)
    draw_figure(circuit, out, scores=scores, aggregate=aggregate, max_edges=max_edges, title=title)
    console.print(f"wrote {out}: {circuit.n_edges:,} span edges")


from .cli_stream import attribute_command, evaluate_command  # noqa: E402

app.command("attribute")(attribute_command)
app.command("evaluate")(evaluate_command)

benchmark_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the circuit finders.")
app.add_typer(benchmark_app, name="benchmark")

from .patching.cli import patch_app  # noqa: E402  (sub-app of `mechscope patch`)

app.add_typer(patch_app, name="patch")


@benchmark_app.command("tracr")
@_user_errors
def benchmark_tracr(
    programs: Optional[str] = typer.Option(None, help="Comma-separated programs of the suite (default: the "
                                           "whole suite, or none when --program is given)."),
    program: Optional[list[str]] = typer.Option(None, "--program", help="A program of your own, "
                                                "module:function or path/to/file.py:function; the function "
                                                "returns a mechscope.toys.tracr.ProgramSpec (repeatable)."),
    methods: str = typer.Option("eap,eap-ig,peap,exact", help="Comma-separated methods."),
    n: int = typer.Option(48, "--n", help="Prompt pairs per program."),
    seed: int = typer.Option(0, help="Seed of the task generator (and of the inputs sampled)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="New directory for report.html and benchmark.json."),
    device: Optional[str] = _device_option(),
) -> None:
    """Compile RASP programs with tracr (circuits known by construction), score every edge with each
    method, and report node- and edge-level ROC AUC against the ground-truth circuits, as computed
    and with scores below 1e-6 of each method's largest set to 0 (floor)."""
    from .report import check_output_dir
    from .devices import resolve_device
    from .toys.tracr.benchmark import BenchmarkError, check_choices, run_benchmark
    from .toys.tracr.programs import SUITE, load_program
    from .toys.tracr.report import fmt_auroc, write_benchmark

    chosen = [p.strip() for p in programs.split(",") if p.strip()] if programs else ([] if program else list(SUITE))
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    check_choices(chosen, wanted, n)  # before any compilation, like the output directory
    resolve_device(device)
    if out is not None:
        check_output_dir(out)
    specs = {}
    for ref in program or []:  # imports the user's module and builds the RASP program; compiles nothing
        name, spec = load_program(ref)
        if name in specs or name in chosen:
            raise BenchmarkError(f"--program {ref}: a program named {name} is already chosen; rename the function")
        specs[name] = spec
    chosen += list(specs)

    def done(r):
        aucs = "  ".join(f"{m} {fmt_auroc(r.edge_auroc[m])} (floor {fmt_auroc(r.edge_auroc_floor[m])})" for m in wanted)
        err_console.print(f"{r.program}: {r.n_edges} graph edges, {r.truth['n_edges']} in the circuit; edge AUROC {aucs}")
        inputs = r.inputs
        if inputs.get("dropped") or inputs.get("sampled_lengths"):
            sampled = inputs["sampled_lengths"]
            err_console.print(f"{r.program}: {inputs['evaluated']} of {inputs['space']} inputs evaluated"
                              + (f" (lengths {', '.join(map(str, sampled))} sampled)" if sampled else "")
                              + f"; {inputs['dropped']} dropped because the RASP program raised on them", highlight=False)

    summary = run_benchmark(chosen, n=n, seed=seed, methods=wanted, progress=done, device=device, specs=specs)
    table = Table(title="ROC AUC against the compiled ground truth (edge / node; whole-program edge), "
                        f"as computed and with scores below {summary['floor']:g} x the largest as 0 (floor)")
    table.add_column("program")
    for m in wanted:
        table.add_column(m)

    def cells(auc):  # auc(key, method) -> AUROC
        return [f"{fmt_auroc(auc('edge_auroc', m))} / {fmt_auroc(auc('node_auroc', m))}; "
                f"{fmt_auroc(auc('program_edge_auroc', m))}\n"
                f"floor {fmt_auroc(auc('edge_auroc_floor', m))} / {fmt_auroc(auc('node_auroc_floor', m))}; "
                f"{fmt_auroc(auc('program_edge_auroc_floor', m))}" for m in wanted]

    for r in summary["programs"]:
        table.add_row(r["program"], *cells(lambda key, m, r=r: r[key][m]))
    table.add_row("mean", *cells(lambda key, m: summary["means"][m][key]))
    console.print(table)
    if out is not None:
        write_benchmark(out, summary)
        console.print(f"wrote {out}/report.html and {out}/benchmark.json")
    console.print(f"best_method={summary['best_method']}")
    console.print(f"best_mean_edge_auroc={summary['best_mean_edge_auroc']:.4f}", highlight=False)
    console.print(f"best_method_floor={summary['best_method_floor']}")
    console.print(f"best_mean_edge_auroc_floor={summary['best_mean_edge_auroc_floor']:.4f}", highlight=False)


from .lens.cli import lens_app  # noqa: E402  (after the helpers it uses)

app.add_typer(lens_app, name="lens")

from .dictionaries.cli import sae_app  # noqa: E402  (after the helpers it uses)

app.add_typer(sae_app, name="sae")

from .toys.cli import toy_app  # noqa: E402  (after the helpers it uses)

app.add_typer(toy_app, name="toy")

from .steering.cli import steer_app  # noqa: E402  (after the helpers it uses)

app.add_typer(steer_app, name="steer")

from .probes.cli import probe_app  # noqa: E402  (after the helpers it uses)

app.add_typer(probe_app, name="probe")


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
