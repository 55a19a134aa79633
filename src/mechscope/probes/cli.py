"""`mechscope probe train`: per-layer probes of a concept (built in, or a JSONL file of the user's), with the
control task, sparse probes and CCS, written as a report directory with the saved probes. The concept
file and the output are checked before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..cli_common import _batch_option, _device_option, _model_option, _user_errors, console, err_console

probe_app = typer.Typer(no_args_is_help=True, help="Linear and sparse probes, control tasks and CCS, per layer.")


@probe_app.command("train")
@_user_errors
def train(
    concept: Optional[str] = typer.Option(None, "--concept", "-c", help="Built-in concept: sentiment, number, truth."),
    data: Optional[Path] = typer.Option(None, "--data", help="A JSONL file of {\"text\", \"label\"} rows or "
                                        "{\"positive\", \"negative\"} pairs (instead of --concept)."),
    model: str = _model_option(),
    hook_point: Optional[List[str]] = typer.Option(None, "--hook-point", help="Hook point to probe (repeat the option "
                                                   "for several; default: every layer's blocks.L.hook_resid_post)."),
    position: str = typer.Option("last", "--position", help="last, mean, or a token index (BOS is 0; negative counts "
                                 "from the end)."),
    n: int = typer.Option(200, "--n", help="Texts of a built-in concept (n / 2 contrast pairs)."),
    test_fraction: float = typer.Option(0.3, "--test-fraction", help="Share of the contrast pairs held out."),
    seed: int = typer.Option(0, "--seed", help="Seed of the concept texts, the split and the control labels."),
    k: int = typer.Option(16, "--k", help="Neurons the top-k sparse probe reads."),
    l2: float = typer.Option(1.0, "--l2", help="L2 strength of the linear probe (on standardised features; scikit-"
                             "learn's C = 1 / l2). Larger values lower the control task's accuracy (Hewitt & Liang)."),
    l1: float = typer.Option(0.01, "--l1", help="L1 strength of the sparse probe."),
    ccs_seeds: int = typer.Option(5, "--ccs-seeds", help="CCS random starts (0: no CCS)."),
    ccs_steps: int = typer.Option(1000, "--ccs-steps", help="AdamW steps per CCS start."),
    out: Path = typer.Option(..., "--out", "-o", help="New report directory: report.html, summary.json, probes.png, "
                             "probes/ (the saved probes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report directory."),
    batch_size: Optional[int] = _batch_option(),
    device: Optional[str] = _device_option(),
) -> None:
    """Fit a probe at every hook point on a training split of the concept's texts and report held-out
    accuracy, control-task accuracy and selectivity, sparse probes and CCS per layer."""
    from ..devices import resolve_device
    from ..errors import ParameterError, check_count
    from ..models import load_model, load_tokenizer
    from ..report import check_output_dir, write_sections
    from ..report.sections.probes import probe_figure_png, section
    from .concepts import CONCEPTS, load_concept, make_concept
    from .study import probe_layers, save_probes

    if (concept is None) == (data is None):
        raise ParameterError("give exactly one of --concept (" + ", ".join(CONCEPTS) + ") or --data FILE.jsonl")
    pos: int | str = position
    if position not in ("last", "mean"):
        try:
            pos = int(position)
        except ValueError:
            raise ParameterError(f"--position must be last, mean or a token index, got {position!r}") from None
    check_count("--n", n, 2)
    if not l2 >= 0 or not l1 >= 0:
        raise ParameterError("--l2 and --l1 must be >= 0")
    check_count("--ccs-seeds", ccs_seeds, 0)
    check_count("--ccs-steps", ccs_steps)
    resolve_device(device)
    check_output_dir(out, overwrite)
    if data is not None:
        concept_set = load_concept(data)  # a bad file fails before anything loads
    else:
        concept_set = make_concept(concept, load_tokenizer(model), n=n, seed=seed)
    concept_set.split(test_fraction, seed)  # too small to split: fail before the model loads
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    study = probe_layers(bridge, concept_set, hook_point or None, pos, test_fraction=test_fraction, seed=seed, l2=l2,
                         l1=l1,
                         k=k, ccs_seeds=ccs_seeds, ccs_steps=ccs_steps, batch_size=batch_size)
    summary = study.summary()
    png = probe_figure_png([summary])
    files = {"summary.json": lambda p: p.write_text(json.dumps(summary, indent=1), encoding="utf-8"),
             "probes.png": lambda p: p.write_bytes(png),
             "probes": lambda p: save_probes(p, study.probes, bridge, meta={"concept": study.concept,
                                                                               "position": study.position})}
    write_sections(out, f"Probes: {study.concept} on {study.model}", [section([summary], png)], files,
                   subtitle=f"{study.n_train} training / {study.n_test} held-out texts, position {study.position}",
                   overwrite=overwrite)
    for r in study.rows:
        console.print("  ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in r.items()), highlight=False)
    best = study.best()
    console.print(f"best {best['hook_point']}: accuracy {best['accuracy']:.3f}"
                  + (f", selectivity {best['selectivity']:.3f}" if "selectivity" in best else ""), highlight=False)
    console.print(f"wrote {out}/report.html, summary.json, probes.png, probes/")
