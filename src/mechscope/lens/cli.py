"""`mechscope lens train` and `mechscope lens eval`: the tuned lens and the logit lens from the command
line. Every check of the user's input (the text, the lens directory, the output, the counts) runs
before the model loads; only the tokenizer is loaded first, to check that the text is long enough."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _device_option, _model_option, _user_errors, console, err_console

lens_app = typer.Typer(no_args_is_help=True, help="Logit lens and tuned lens: train, evaluate, report.")

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"
TRAIN_SEED, HELD_OUT_SEED = 0, 1


def _text_tokens(text: Optional[Path], model: str, length: int, count: int):
    """The user's text as token ids (checked with the model's tokenizer alone), or None for the
    sampled default."""
    from ..errors import check_count
    from ..models import load_tokenizer
    from .text import read_text, tokenize_text

    check_count("--length", length, 2)
    check_count("--count", count)
    if text is None:
        return None
    docs = read_text(text)  # a missing, empty or malformed file fails before the tokenizer loads
    return tokenize_text(docs, load_tokenizer(model), length, count, source=str(text))


def _tokens(bridge, given, seed: int, length: int, count: int):
    from .text import sampled_text

    if given is not None:
        return given
    err_console.print(f"text: {count} sequences of {length} tokens sampled from {bridge.mechscope_name} "
                      f"(seed {seed}, temperature 1, no top-k; cached)", highlight=False)
    return sampled_text(bridge, length=length, count=count, seed=seed)


def _precheck_lens(lens_dir: Path, model: str):
    """The lens directory read, and its shape compared with the model's configuration (no weights
    loaded)."""
    from ..models import resolve_spec
    from .logit_lens import LensError
    from .tuned_lens import TunedLens

    lens = TunedLens.load(lens_dir)
    kind, location = resolve_spec(model)
    if kind != "hub":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(location))
        cfg = getattr(cfg, "text_config", None) or cfg
        d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        if (d, n) != (lens.d_model, lens.n_layers):
            raise LensError(f"{lens_dir} was trained for a model with d_model {lens.d_model} and {lens.n_layers} "
                            f"layers ({lens.config.get('model', 'unknown model')}), but {model} has d_model {d} "
                            f"and {n} layers")
    return lens


@lens_app.command("train")
@_user_errors
def train(
    model: str = _model_option(),
    text: Optional[Path] = typer.Option(None, "--text", help="Training text: a .txt file, a .jsonl with a \"text\" "
                                        "field, or a `datasets` directory (default: text sampled from the model, seed --seed)."),
    tokens: int = typer.Option(2048, "--tokens", help="Positions to train on in all (steps x --tokens-per-step)."),
    tokens_per_step: int = typer.Option(128, "--tokens-per-step", help="Positions per Adam step."),
    length: int = typer.Option(128, "--length", help="Tokens per sequence, BOS included."),
    count: int = typer.Option(32, "--count", help="Sequences of training text (sampled, or at most this many of --text)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam's learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(TRAIN_SEED, "--seed", help="Seed of the sampled text and of the training order."),
    out: Path = typer.Option(..., "--out", "-o", help="The lens directory to write (lens.safetensors + lens.json)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing lens directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Train a tuned lens (an affine translator per layer, identity at the start) on text, the model
    frozen; the lens directory is written only once training is complete."""
    from ..devices import resolve_device
    from ..errors import ParameterError, check_count
    from ..fileio import OutputError, check_parent_writable
    from ..models import load_model
    from .text import describe_source
    from .tuned_lens import train_tuned_lens

    check_count("--tokens", tokens)
    check_count("--tokens-per-step", tokens_per_step)
    if not lr > 0:
        raise ParameterError(f"--lr must be > 0, got {lr}")
    resolve_device(device)
    check_parent_writable(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; choose a new --out or pass --overwrite")
    if out.exists() and not (out / "lens.json").is_file():
        raise OutputError(f"{out}: exists and is not a tuned lens directory; --overwrite replaces only a lens")
    given = _text_tokens(text, model, length, count)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    train_tokens = _tokens(bridge, given, seed, length, count)
    lens, log = train_tuned_lens(bridge, train_tokens, n_tokens=tokens, tokens_per_step=tokens_per_step, lr=lr,
                                 seed=seed, text=describe_source(text, seed, length, len(train_tokens)))
    lens.save(out, overwrite=overwrite)
    console.print(f"wrote {out}: {lens.n_layers} translators, {log.tokens:,} training positions in {log.steps} steps, "
                  f"{log.seconds:.1f} s; mean KL over layers {log.losses[0]:.3f} -> {log.losses[-1]:.3f} "
                  "(training batches)", highlight=False)


@lens_app.command("eval")
@_user_errors
def evaluate(
    model: str = _model_option(),
    lens_dir: Optional[Path] = typer.Option(None, "--lens", help="A tuned lens directory (from `lens train`); "
                                            "without it only the logit lens is evaluated."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text (.txt, .jsonl, `datasets` directory; "
                                        "default: text sampled from the model with --seed)."),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="The prompt whose per-layer predictions are shown."),
    k: int = typer.Option(5, "--k", help="Predictions per layer and position."),
    length: int = typer.Option(128, "--length", help="Tokens per sequence, BOS included."),
    count: int = typer.Option(8, "--count", help="Sequences of held-out text."),
    seed: int = typer.Option(HELD_OUT_SEED, "--seed", help="Seed of the sampled held-out text (train's default is 0)."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory: report.html, kl.csv, kl.json, kl.png, predictions.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Mean KL(final || lens) per layer on held-out text for the logit lens (and the tuned lens), the
    top-k predictions per layer for a prompt, a figure and a report."""
    from ..devices import resolve_device
    from ..errors import check_count
    from ..models import load_model
    from ..report import check_output_dir, write_sections
    from ..report.sections.lens import section
    from .evaluation import evaluate_lenses, kl_figure, lens_predictions
    from .logit_lens import LensError
    from .text import describe_source

    check_count("--k", k)
    if not prompt.strip():
        raise LensError("--prompt is empty")
    resolve_device(device)
    check_output_dir(out, overwrite)
    lens = _precheck_lens(lens_dir, model) if lens_dir is not None else None
    given = _text_tokens(text, model, length, count)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    if lens is not None:
        lens.check_fits(bridge, str(lens_dir))
        lens.to(bridge.W_U.device)
    held_out = _tokens(bridge, given, seed, length, count)
    source = describe_source(text, seed, length, len(held_out))
    result = evaluate_lenses(bridge, held_out, lens, text=source)
    grid = lens_predictions(bridge, prompt, lens, k=k)
    files = {"kl.csv": result.save_csv, "kl.json": result.save, "predictions.json": grid.save,
             "kl.png": lambda p: kl_figure(result, p)}
    write_sections(out, f"Lenses: {result.model}", [section(result, grid, lens.config if lens else None)], files,
                   subtitle=f"held-out text: {_describe(source)}", overwrite=overwrite)
    for row in result.rows():
        console.print("  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in row.items()), highlight=False)
    console.print(f"wrote {out}/report.html, kl.csv, kl.json, kl.png, predictions.json "
                  f"({result.n_positions:,} held-out positions)")


def _describe(source: dict) -> str:
    if source.get("source") == "sampled from the model":
        return f"{source['count']} x {source['length']} tokens sampled from the model (seed {source['seed']})"
    return f"{source['source']} ({source['count']} x {source['length']} tokens)"
