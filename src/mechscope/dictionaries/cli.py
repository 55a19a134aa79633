"""`mechscope sae train | eval | export`: sparse dictionaries from the command line.

Every check of the user's input that needs no model (the choices and counts, the text, the dictionary
directory, the output) runs before the model loads; the hook point and the widths are checked against
the model once it is there (an unknown hook point lists the valid ones)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer

from ..cli_common import (_device_option, _model_option, _user_errors, console, data_parallel, err_console,
                          rank_device, writes_results)

sae_app = typer.Typer(no_args_is_help=True, help="Sparse dictionaries (SAEs, transcoders): train, measure, export.")

TRAIN_SEED, HELD_OUT_SEED = 0, 1
METRICS = "metrics.json"
REPORT = "report"
TRAINABLE = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "transcoder", "skip_transcoder")


def _user_text(text: Optional[Path], model: str, length: int):
    """The user's text as token ids, read and checked with the tokenizer alone (None: sampled later)."""
    from ..lens.text import read_text, tokenize_text
    from ..models import load_tokenizer

    if text is None:
        return None
    docs = read_text(text)  # a missing, empty or malformed file fails here, before any model loads
    return tokenize_text(docs, load_tokenizer(model), length, None, source=str(text))


def _check_out(out: Path, overwrite: bool) -> None:
    from ..fileio import OutputError, check_parent_writable

    check_parent_writable(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(f"{out}: exists and is not an empty directory; choose a new --out or pass --overwrite")


def _metrics_section(metrics, title: str):
    from html import escape

    from ..report.page import Section

    rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float) else
                   f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in metrics.rows())
    hist = metrics.density_histogram
    edges = metrics.density_edges
    dens = "".join(f"<tr><td>[{edges[i]:.1f}, {edges[i + 1]:.1f})</td><td>{n}</td></tr>"
                   for i, n in enumerate(hist) if n)
    html = (f"<p>{escape(title)}: {metrics.architecture} dictionary of {metrics.d_sae} latents at "
            f"<code>{escape(metrics.hook_point)}</code>, {metrics.predictions:,} held-out next-token predictions "
            "(BOS positions untouched and left out). CE recovered is (CE<sub>ablated</sub> − CE<sub>spliced</sub>) / "
            "(CE<sub>ablated</sub> − CE<sub>clean</sub>) with zero and with mean ablation as the baseline; KL is "
            "KL(clean ‖ spliced) in nats; spliced = reconstruction without the error term.</p>"
            f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"
            f"<p>Latent density (log10 of the fraction of tokens a latent fires on; {metrics.dead} dead latents "
            f"apart):</p><table><tr><th>log10 density</th><th>latents</th></tr>{dens}</table>")
    return Section(id="sae-metrics", title="Dictionary metrics", html=html)


def _sampled(bridge, count: int, length: int, seed: int):
    from ..lens.text import sampled_text

    err_console.print(f"text: {count} sequences of {length} tokens sampled from the model (seed {seed}, cached)",
                      highlight=False)
    return sampled_text(bridge, length=length, count=count, seed=seed)


def _print_metrics(metrics) -> None:
    console.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.rows()),
                  highlight=False)


@sae_app.command("train")
@_user_errors
@data_parallel
def train(
    model: str = _model_option(),
    hook: str = typer.Option(..., "--hook", help="The hook point read, e.g. blocks.15.hook_resid_post "
                             "(a transcoder: its input, e.g. blocks.3.ln2.hook_out)."),
    target: Optional[str] = typer.Option(None, "--target", help="Transcoders: the hook point written "
                                         "(e.g. blocks.3.hook_mlp_out)."),
    architecture: str = typer.Option("topk", "--architecture", help=f"One of {', '.join(TRAINABLE)}."),
    k: int = typer.Option(32, "--k", help="Active latents per token: exactly k for topk, batchtopk and matryoshka; "
                          "the L0 trained to for relu, gated and jumprelu (train(..., target_l0=k))."),
    expansion: int = typer.Option(8, "--expansion", help="Latents per activation dimension (d_sae = expansion x d)."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Number of latents (instead of --expansion)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Training text: .txt, .jsonl with a \"text\" field, or a "
                                        "`datasets` directory (default: text sampled from the model)."),
    tokens: int = typer.Option(20_000, "--tokens", help="Training positions in all (steps = tokens / batch size)."),
    held_out: int = typer.Option(8, "--held-out", help="Held-out sequences the metrics are measured on."),
    length: int = typer.Option(128, "--length", help="Tokens per sequence, BOS included."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Positions per optimizer step."),
    lr: float = typer.Option(5e-4, "--lr", help="Adam's learning rate (warm-up, constant, linear decay)."),
    seed: int = typer.Option(TRAIN_SEED, "--seed", help="Seed of the initial weights, the sampled text and the order."),
    out: Path = typer.Option(..., "--out", "-o", help="The dictionary directory to write (config.json, "
                             "dictionary.safetensors, metrics.json, training.json, report/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of the same settings from "
                                "its checkpoint (OUT.checkpoint)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory at --out."),
    device: Optional[str] = _device_option(),
) -> None:
    """Train a dictionary on the model's activations at --hook, measure it on held-out text (L0, FVU, dead
    latents, CE recovered against zero and mean ablation, KL) and write it with its metrics and a report."""
    from ..devices import model_device, resolve_device
    from ..errors import ParameterError, check_count
    from ..fileio import atomic_dir
    from ..lens.text import TextError
    from ..models import load_model
    from ..report import write_sections
    from .activations import for_dictionary
    from .dictionary import Dictionary, DictionaryConfig, DictionaryError
    from .measure import measure
    from .target_l0 import COEFFICIENT
    from .training import train as train_dictionary

    if architecture not in TRAINABLE:
        raise ParameterError(f"unknown architecture {architecture!r}; choose one of {', '.join(TRAINABLE)} "
                             "(crosscoders: use the Python API)")
    transcoder = architecture in ("transcoder", "skip_transcoder")
    if transcoder and not target:
        raise ParameterError(f"a {architecture} needs --target, the hook point it writes (e.g. blocks.0.hook_mlp_out)")
    if target and not transcoder:
        raise ParameterError(f"--target is for transcoders; a {architecture} reads and writes --hook")
    for name, value in (("--k", k), ("--expansion", expansion), ("--tokens", tokens), ("--held-out", held_out),
                        ("--batch-size", batch_size)):
        check_count(name, value)
    check_count("--length", length, 2)
    if d_sae is not None:
        check_count("--d-sae", d_sae)
    if not (lr > 0 and math.isfinite(lr)):
        raise ParameterError(f"--lr must be a positive number, got {lr}")
    steps = max(1, tokens // batch_size)
    resolve_device(device)
    checkpoint = out.parent / f"{out.name}.checkpoint"
    _check_out(out, overwrite)
    if resume and not checkpoint.is_dir():
        raise DictionaryError(f"{checkpoint}: no checkpoint to resume from")
    if not resume and checkpoint.exists():
        raise DictionaryError(f"{checkpoint}: an interrupted run's checkpoint is there; pass --resume to continue "
                              "it or remove it")
    given = _user_text(text, model, length)
    n_train = math.ceil(tokens / (length - 1))
    if given is not None and given.shape[0] < held_out + 1:
        raise TextError(f"{text}: {given.shape[0]} sequences of {length} tokens, not enough for {held_out} held-out "
                        "sequences and one to train on (give more text, or lower --held-out or --length)")
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=rank_device(device))
    from .activations import check_points, hook_widths

    points = check_points(bridge, [hook] + ([target] if target else []))
    widths = hook_widths(bridge, points)
    d_in = widths[hook]
    width = d_sae if d_sae is not None else expansion * d_in
    if k > width or (k == width and architecture not in ("topk", "batchtopk", "matryoshka")):
        raise ParameterError(f"--k {k} is more than the {width} latents" if k > width else
                             f"--k {k}, the L0 a {architecture} trains to, must be below the {width} latents")
    from ..lens.text import model_fingerprint

    extra = {"training": {"tokens": tokens, "batch_size": batch_size, "lr": lr, "seed": seed, "length": length,
                          "text": str(text) if text else "sampled from the model"}}
    prefixes = tuple(sorted({max(1, width // 4), max(1, width // 2), width})) if architecture == "matryoshka" else ()
    config = DictionaryConfig(architecture, d_in, width, hook, d_out=widths[target] if target else 0,
                              out_hook_point=target or "", k=k, model_name=getattr(bridge, "mechscope_name", model),
                              model_fingerprint=model_fingerprint(bridge), prefixes=prefixes, extra=extra)
    if given is not None:
        train_tokens, held = given[:-held_out][:n_train], given[-held_out:]
    else:  # under torchrun rank 0 samples (and caches) the text and hands it to the other ranks
        from .. import distributed

        sampled = None
        with distributed.together():
            if writes_results():
                sampled = _sampled(bridge, n_train, length, seed), _sampled(bridge, held_out, length,
                                                                            seed + HELD_OUT_SEED)
        train_tokens, held = distributed.gather_objects(sampled)[0]
    sae = Dictionary(config, device=model_device(bridge)).init_weights(seed)
    buffer = for_dictionary(bridge, config, train_tokens, batch_size=batch_size, seed=seed, loop=True,
                            drop_last=True, progress=False)
    err_console.print(buffer.note, highlight=False)
    start = time.perf_counter()
    # a latent silent for the last tenth of the run counts as dead (and feeds AuxK in topk-style training)
    dead_after = min(1_000_000, max(batch_size, steps * batch_size // 10))
    result = train_dictionary(sae, buffer, steps, lr=lr, checkpoint=checkpoint, checkpoint_every=max(1, steps // 10),
                              resume=resume, progress=True, dead_after=dead_after,
                              target_l0=float(k) if config.sparsity in COEFFICIENT else None)
    seconds = time.perf_counter() - start
    # Under torchrun each rank read its own share of the sequences (the buffer shards them) and the
    # gradients were all-reduced, so every rank holds the same dictionary: rank 0 measures and writes it.
    if not writes_results():
        return
    metrics = measure(bridge, sae, held)
    rate = result.tokens / seconds if seconds > 0 else float("nan")
    summary = {"steps": result.steps, "tokens": result.tokens, "seconds": seconds, "tokens_per_second": rate,
               "history": result.history}

    def write_training(path):
        from ..fileio import write_json

        write_json(path, summary)

    with atomic_dir(out, error=DictionaryError, replace=overwrite) as tmp:
        sae.write_files(tmp)
        metrics.save(tmp / METRICS)
        write_training(tmp / "training.json")
        write_sections(tmp / REPORT, f"Dictionary: {config.architecture} at {hook}",
                       [_metrics_section(metrics, "held-out text")],
                       {METRICS: lambda p: metrics.save(p)},
                       subtitle=f"{result.tokens:,} training positions, {seconds:.1f} s ({rate:,.0f} tokens/s)")
    import shutil

    shutil.rmtree(checkpoint, ignore_errors=True)
    _print_metrics(metrics)
    console.print(f"wrote {out}: {config.architecture}, {width} latents at {hook}, {result.tokens:,} positions in "
                  f"{result.steps} steps, {seconds:.1f} s ({rate:,.0f} tokens/s)", highlight=False)


@sae_app.command("eval")
@_user_errors
def evaluate(
    model: str = _model_option(),
    sae_dir: Path = typer.Option(..., "--sae", help="A dictionary directory: mechscope's, SAELens' or sparsify's."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text (.txt, .jsonl, `datasets` directory; "
                                        "default: text sampled from the model with --seed)."),
    count: int = typer.Option(8, "--count", help="Held-out sequences (sampled, or at most this many of --text)."),
    length: int = typer.Option(128, "--length", help="Tokens per sequence, BOS included."),
    seed: int = typer.Option(HELD_OUT_SEED, "--seed", help="Seed of the sampled held-out text."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per forward pass."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory: report.html and metrics.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Measure a dictionary on the model: CE loss clean, spliced, zero- and mean-ablated, CE recovered
    against both baselines, KL(clean || spliced), L0, FVU, dead latents and the density histogram."""
    from ..devices import model_device, resolve_device
    from ..errors import check_count
    from ..models import load_model
    from ..report import check_output_dir, write_sections
    from .interop import load_any
    from .measure import measure

    check_count("--count", count)
    check_count("--length", length, 2)
    if batch_size is not None:
        check_count("--batch-size", batch_size)
    resolve_device(device)
    check_output_dir(out, overwrite)
    sae = load_any(sae_dir)  # a missing, corrupt or foreign directory fails before the model loads
    given = _user_text(text, model, length)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    sae = sae.to(model_device(bridge))
    sae.check_model(bridge)  # an unknown hook point lists the valid ones; a width that does not fit is named
    held = given[:count] if given is not None else _sampled(bridge, count, length, seed)
    metrics = measure(bridge, sae, held, batch_size=batch_size)
    write_sections(out, f"Dictionary: {sae.config.architecture} at {metrics.hook_point}",
                   [_metrics_section(metrics, str(sae_dir))], {METRICS: metrics.save},
                   subtitle=f"{sae_dir} on {metrics.model}", overwrite=overwrite)
    _print_metrics(metrics)
    console.print(f"wrote {out}/report.html, {METRICS}", highlight=False)


@sae_app.command("export")
@_user_errors
def export(
    sae_dir: Path = typer.Option(..., "--sae", help="A dictionary directory (mechscope's, SAELens' or sparsify's)."),
    to: str = typer.Option("saelens", "--to", help="The layout to write: saelens."),
    out: Path = typer.Option(..., "--out", "-o", help="The directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
) -> None:
    """Write a dictionary in another library's layout (SAELens: cfg.json + sae_weights.safetensors)."""
    from ..errors import ParameterError
    from .interop import export_saelens, load_any

    if to != "saelens":
        raise ParameterError(f"unknown layout {to!r} for --to; choose saelens")
    _check_out(out, overwrite)
    sae = load_any(sae_dir)
    export_saelens(sae, out, overwrite=overwrite)
    console.print(f"wrote {out} (SAELens layout) from {sae_dir}", highlight=False)


from .cli_dashboard import register as _register_dashboard  # noqa: E402  (`mechscope sae dashboard`)

_register_dashboard(sae_app)

from .cli_attribute import register as _register_attribute  # noqa: E402  (`mechscope sae attribute`)

_register_attribute(sae_app)
