"""`mechscope steer`: continuations of a prompt without and with a steering vector, and `mechscope steer
sweep`: behaviour and side-effect curves against α over layers, as a report directory.

The vector is either a saved one (`--vector FILE`, refused when made on another model) or the CAA
vector of a built-in concept (`--concept sentiment|number|truth`, from `mechscope.probes.concepts`) at
the residual stream after `--layer`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import _device_option, _model_option, _user_errors, console, err_console

steer_app = typer.Typer(no_args_is_help=True, help="Steering vectors: add a concept direction to the residual stream and see what it does.")


def _floats(text: str, option: str) -> list[float]:
    from .vectors import SteeringError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteeringError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise SteeringError(f"{option} is empty")
    return values


def _concept(name: str, tokenizer, n: int):
    from .vectors import SteeringError

    try:
        from ..probes.concepts import make_concept
    except ImportError:
        raise SteeringError("the built-in concepts need mechscope.probes.concepts, which this installation lacks; "
                            "give a saved vector with --vector FILE") from None
    return make_concept(name, tokenizer, n=n)


def _pairs(concept) -> tuple[list[str], list[str]]:
    return [concept.texts[i] for i, _ in concept.pairs], [concept.texts[j] for _, j in concept.pairs]


def _vectors(bridge, vector: Optional[Path], concept_name: Optional[str], layers: list[int], n_pairs: int):
    """(vectors, concept or None): the saved vector, or CAA of the concept at each layer's resid_post."""
    from .vectors import SteeringError, SteeringVector, caa_many

    if vector is not None:
        return [SteeringVector.load(vector, bridge)], None
    if not concept_name:
        raise SteeringError("give --concept NAME (a built-in concept) or --vector FILE (a saved steering vector)")
    for layer in layers:
        if not 0 <= layer < bridge.cfg.n_layers:
            raise SteeringError(f"--layer {layer} is outside 0 .. {bridge.cfg.n_layers - 1}")
    concept = _concept(concept_name, bridge.tokenizer, n_pairs)
    pos, neg = _pairs(concept)
    found = caa_many(bridge, pos, neg, [f"blocks.{l}.hook_resid_post" for l in layers], progress=True)
    for v in found.values():
        v.provenance["concept"] = concept_name
    return list(found.values()), concept


def _check_vector_file(vector: Optional[Path]) -> None:
    from .vectors import SteeringError

    if vector is not None and not vector.is_file():
        raise SteeringError(f"{vector}: no such steering vector file")


@steer_app.callback(invoke_without_command=True)
@_user_errors
def steer(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt to continue."),
    alpha: float = typer.Option(4.0, "--alpha", help="Scale of the vector added at every position."),
    concept: Optional[str] = typer.Option(None, "--concept", help="Built-in concept whose CAA vector steers: "
                                          "sentiment, number or truth."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer whose residual stream (hook_resid_post) is "
                                        "steered (default: the middle layer)."),
    vector: Optional[Path] = typer.Option(None, "--vector",
                                          help="A saved steering vector (.safetensors) instead of a concept."),
    save_vector: Optional[Path] = typer.Option(None, "--save-vector", help="Write the concept's CAA vector here."),
    n_pairs: int = typer.Option(200, "--pairs",
                                help="Texts of the concept set (its contrast pairs give the CAA vector)."),
    model: str = _model_option(),
    max_new_tokens: int = typer.Option(30, "--max-new-tokens", help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample at temperature 1 (seeded) instead of greedy."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler."),
    device: Optional[str] = _device_option(),
) -> None:
    """Print the continuation of --prompt without and with steering."""
    if ctx.invoked_subcommand is not None:
        return
    from ..devices import resolve_device
    from ..errors import check_count
    from ..fileio import check_writable_file
    from ..models import load_model
    from .apply import continuation
    from .vectors import SteeringError

    if prompt is None or not prompt.strip():
        raise SteeringError("give a non-empty --prompt")
    check_count("--max-new-tokens", max_new_tokens)
    _check_vector_file(vector)
    if save_vector is not None:
        check_writable_file(save_vector)
    resolve_device(device)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    layer = bridge.cfg.n_layers // 2 if layer is None else layer
    (vec,), _ = _vectors(bridge, vector, concept, [layer], n_pairs)
    if save_vector is not None:
        vec.save(save_vector)
        err_console.print(f"wrote {save_vector}", highlight=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, seed=seed)
    plain = continuation(bridge, prompt, **kwargs)
    pushed = continuation(bridge, prompt, vector=vec, alpha=alpha, **kwargs)
    console.print(f"vector: {vec.method} at {vec.hook_point} (norm {float(vec.vector.norm()):.3f}), alpha {alpha:g}",
                  highlight=False)
    console.print(f"without steering: {prompt}{plain}", highlight=False, markup=False)
    console.print(f"with steering:    {prompt}{pushed}", highlight=False, markup=False)


@steer_app.command("sweep")
@_user_errors
def sweep_command(
    concept: Optional[str] = typer.Option(None, "--concept", help="Built-in concept: sentiment, number or truth."),
    vector: Optional[Path] = typer.Option(None, "--vector", help="A saved steering vector instead of a concept's "
                                          "(then give --positive-words, --negative-words and --prompt)."),
    layers: Optional[str] = typer.Option(None, "--layers",
                                         help="Comma-separated layers (default: four spread over the model)."),
    alphas: str = typer.Option("-8,-4,-2,0,2,4,8", "--alphas", help="Comma-separated scales."),
    positive_words: Optional[str] = typer.Option(None, "--positive-words", help="With --vector: comma-separated words "
                                                 "whose logits count for the behaviour (first token of each)."),
    negative_words: Optional[str] = typer.Option(None, "--negative-words", help="With --vector: words counted against."),
    prompts: list[str] = typer.Option([], "--prompt", help="Prompt(s) for the sample generations (and, with --vector, "
                                      "the behaviour)."),
    n_pairs: int = typer.Option(200, "--pairs", help="Texts of the concept set."),
    neutral_count: int = typer.Option(16, "--neutral-count", help="Sequences of neutral text (sampled from the model)."),
    neutral_length: int = typer.Option(64, "--neutral-length", help="Tokens per neutral sequence."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens per sample generation."),
    model: str = _model_option(),
    out: Path = typer.Option(..., "--out", "-o", help="New report directory: report.html, steering.json, steering.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report directory."),
    device: Optional[str] = _device_option(),
) -> None:
    """Behaviour on held-out prompts, KL and loss change on neutral text, against alpha, for each layer;
    the best (layer, alpha) by effect per unit KL; sample generations at the best point."""
    from ..devices import resolve_device
    from ..errors import check_count
    from ..fileio import write_json
    from ..models import load_model
    from ..report import check_output_dir, write_sections
    from ..report.sections.steering import section, steering_png
    from .apply import continuation
    from .measure import neutral_tokens, sweep
    from .vectors import SteeringError

    alpha_list = _floats(alphas, "--alphas")
    check_count("--neutral-count", neutral_count)
    check_count("--neutral-length", neutral_length, 2)
    check_count("--max-new-tokens", max_new_tokens)
    _check_vector_file(vector)
    if vector is not None and not (positive_words and negative_words and prompts):
        raise SteeringError("with --vector, give --positive-words, --negative-words and at least one --prompt "
                            "to measure the behaviour on")
    check_output_dir(out, overwrite)
    resolve_device(device)
    with err_console.status(f"loading {model}"):
        bridge = load_model(model, device=device)
    n = bridge.cfg.n_layers
    layer_list = ([int(x) for x in _floats(layers, "--layers")] if layers
                  else sorted({round(n * f) for f in (0.2, 0.35, 0.5, 0.65)}))
    vecs, concept_set = _vectors(bridge, vector, concept, layer_list, n_pairs)
    if concept_set is not None:
        if concept_set.behaviour is None:
            raise SteeringError(f"concept {concept} has no behaviour metric to steer")
        behaviour, held_out = concept_set.behaviour.score, list(concept_set.behaviour.prompts)
        name = concept
    else:
        behaviour, held_out = word_behaviour(bridge.tokenizer, positive_words, negative_words), list(prompts)
        name = vector.stem
    neutral = neutral_tokens(bridge, length=neutral_length, count=neutral_count, progress=True)
    result = sweep(bridge, vecs, alpha_list, behaviour, held_out, neutral=neutral, progress=True)
    best = result.best()
    gens = []
    if best is not None:
        vec = next(v for v in vecs if v.hook_point == best.hook_point)
        for p in (prompts or held_out[:3]):
            gens.append({"prompt": p, "alpha": best.alpha, "layer": best.layer,
                         "unsteered": continuation(bridge, p, max_new_tokens=max_new_tokens),
                         "steered": continuation(bridge, p, vector=vec, alpha=best.alpha,
                                                 max_new_tokens=max_new_tokens)})
    summary = {"model": model, "concept": name, **result.to_json(), "generations": gens}
    write_sections(out, f"Steering: {name} on {model}", [section(result, gens, concept=str(name))],
                   {"steering.json": lambda p: write_json(p, summary),
                    "steering.png": lambda p: steering_png(result, p, title=str(name))}, overwrite=overwrite)
    for p in result.points:
        console.print(f"layer {p.layer} alpha {p.alpha:+g}: behaviour {p.behaviour:.3f} (effect {p.effect:+.3f}), "
                      f"KL {p.kl:.4f}, loss change {p.loss_change:+.4f}", highlight=False)
    console.print("best: none moved the behaviour" if best is None else
                  f"best: layer {best.layer} alpha {best.alpha:g} ({best.efficiency:.2f} effect per nat of KL)",
                  highlight=False)
    console.print(f"wrote {out}", highlight=False)


def word_behaviour(tokenizer, positive_words: str, negative_words: str):
    """A behaviour metric from two comma-separated word lists: mean logit of the first token of each
    positive word minus that of the negative ones."""
    from .vectors import SteeringError

    def ids(text, option):
        words = [w for w in text.split(",") if w.strip()]
        if not words:
            raise SteeringError(f"{option} is empty")
        return sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})

    pos, neg = ids(positive_words, "--positive-words"), ids(negative_words, "--negative-words")

    def score(logits):
        return logits[:, pos].mean(-1) - logits[:, neg].mean(-1)

    return score
