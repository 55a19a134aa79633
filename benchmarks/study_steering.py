"""CAA steering and directional ablation on SmolLM2-135M (issue 19), in one command:

    python benchmarks/study_steering.py [--model smollm2-135m] [--device cuda] [--quick]

For sentiment and number (mechscope.probes.concepts): the CAA vector (mean difference of the
residual stream after layer l over the training contrast pairs, at the last token) at several layers;
for each layer and alpha (alpha = 1 adds the mean difference once): the behaviour metric on the
concept's held-out prompts (mean logit of the label-1 words minus the label-0 words), KL(unsteered ||
steered) and the change in next-token loss on text sampled from the model; the best (layer, alpha)
by effect per nat of KL among the points reaching half the largest effect. Then directional ablation
of the sentiment direction (the unit CAA vector of the best layer) from every residual write: the
behaviour after it, its side effects, and the accuracy of a linear probe (mechscope.probes.linear)
per layer on held-out texts, before and after the ablation.

Figures: docs/images/steer-sentiment.png, docs/images/steer-number.png, docs/images/steer-ablation.png.
The last lines are key=value figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mechscope
from mechscope.probes.activations import collect
from mechscope.probes.concepts import make_concept
from mechscope.report.sections.steering import steering_png
from mechscope.steering import ablated, caa_many, continuation
from mechscope.steering.measure import ablation_effect, neutral_tokens, sweep

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
PROMPTS = {"sentiment": "I watched the film last night and I thought it was", "number": "The keys to the cabinet"}


def pairs(concept):
    return [concept.texts[i] for i, _ in concept.pairs], [concept.texts[j] for _, j in concept.pairs]


def probe_accuracies(model, train, test, layers, direction=None):
    """{layer: held-out accuracy of a linear probe} on clean activations, and with `direction`
    ablated: the clean probe read on ablated activations, and a probe retrained on ablated ones."""
    from mechscope.probes.linear import fit_probe

    points = [f"blocks.{l}.hook_resid_post" for l in layers]
    clean_tr = collect(model, train.texts, points, progress=False)
    clean_te = collect(model, test.texts, points, progress=False)
    out = {}
    if direction is not None:
        with ablated(model, direction):
            abl_tr = collect(model, train.texts, points, progress=False)
            abl_te = collect(model, test.texts, points, progress=False)
    for l, p in zip(layers, points):
        probe = fit_probe(clean_tr[p], train.labels, p)
        row = {"clean": probe.accuracy(clean_te[p], test.labels)}
        if direction is not None:
            row["clean_probe_on_ablated"] = probe.accuracy(abl_te[p], test.labels)
            row["retrained_on_ablated"] = fit_probe(abl_tr[p], train.labels, p).accuracy(abl_te[p], test.labels)
        out[l] = row
    return out


def ablation_png(acc: dict, path: Path, layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(acc)
    fig, ax = plt.subplots(figsize=(6.5, 3.6), constrained_layout=True)
    for key, label in (("clean", "probe, clean model"), ("clean_probe_on_ablated", "same probe, direction ablated"),
                       ("retrained_on_ablated", "probe retrained after ablation")):
        ax.plot(layers, [acc[l][key] for l in layers], marker="o", ms=3, label=label)
    ax.axhline(0.5, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("layer (residual stream after it)")
    ax.set_ylabel("held-out sentiment accuracy")
    ax.set_title(f"Directional ablation of the layer-{layer} sentiment CAA direction")
    ax.set_ylim(0.3, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=200, help="texts per concept set")
    ap.add_argument("--layers", default=None, help="comma-separated (default: every 3rd layer from 3)")
    ap.add_argument("--alphas", default="-8,-4,-2,-1,0,1,2,4,8")
    ap.add_argument("--neutral-count", type=int, default=16)
    ap.add_argument("--neutral-length", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 layers, 5 alphas, less text: a smoke run")
    ap.add_argument("--images", default=str(IMAGES))
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = mechscope.load_model(args.model, device=args.device)
    n_layers = model.cfg.n_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(3, n_layers, 3))
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.quick:
        layers = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
        alphas = [-4.0, -1.0, 0.0, 1.0, 4.0]
        args.n, args.neutral_count, args.neutral_length = min(args.n, 60), 4, 32
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    neutral = neutral_tokens(model, length=args.neutral_length, count=args.neutral_count, progress=False)
    print(f"model={args.model} device={next(model.parameters()).device} layers={layers} alphas={alphas} "
          f"neutral={tuple(neutral.shape)}")

    results, vectors, concepts = {}, {}, {}
    for name in ("sentiment", "number"):
        concept = make_concept(name, model.tokenizer, n=args.n)
        train, test = concept.split(0.3, seed=0)
        concepts[name] = (concept, train, test)
        pos, neg = pairs(train)
        vecs = caa_many(model, pos, neg, [f"blocks.{l}.hook_resid_post" for l in layers])
        vectors[name] = vecs
        behaviour = concept.behaviour
        res = sweep(model, list(vecs.values()), alphas, behaviour.score, behaviour.prompts, neutral=neutral)
        results[name] = res
        steering_png(res, images / f"steer-{name}.png", title=f"CAA steering: {name} ({args.model})")
        print(f"\n{name}: {len(pos)} training pairs, {len(behaviour.prompts)} held-out behaviour prompts, "
              f"unsteered behaviour {res.baseline:.3f}, unsteered loss {res.base_loss:.3f} nats")
        print(f"{'layer':>5} {'|v|':>7} " + " ".join(f"{'a=' + format(a, 'g'):>16}" for a in alphas))
        for l in layers:
            hp = f"blocks.{l}.hook_resid_post"
            cells = [p for p in res.points if p.hook_point == hp]
            print(f"{l:>5} {float(vecs[hp].vector.norm()):7.2f} "
                  + " ".join(f"{p.effect:+7.2f}/{p.kl:7.4f}" for p in cells))
        print("(cells: behaviour effect / KL in nats)")
        best = res.best()
        if best is None:
            print(f"{name}_best=none (no layer and alpha moved the behaviour)")
        else:
            vec = vecs[best.hook_point]
            prompt = PROMPTS[name]
            print(f"{name}_best_layer={best.layer}")
            print(f"{name}_best_alpha={best.alpha:g}")
            print(f"{name}_best_effect={best.effect:.3f}")
            print(f"{name}_best_kl={best.kl:.4f}")
            print(f"{name}_best_loss_change={best.loss_change:.4f}")
            print(f"{name}_best_effect_per_nat={best.efficiency:.2f}")
            for a in (-best.alpha, 0.0, best.alpha):
                text = continuation(model, prompt, vector=vec, alpha=a, max_new_tokens=16)
                print(f"  [{name} layer {best.layer} alpha {a:+g}] {prompt}{text!r}")

    # directional ablation of the sentiment direction
    concept, train, test = concepts["sentiment"]
    best = results["sentiment"].best()
    layer = best.layer if best is not None else layers[len(layers) // 2]
    direction = vectors["sentiment"][f"blocks.{layer}.hook_resid_post"]
    abl = ablation_effect(model, direction, concept.behaviour.score, concept.behaviour.prompts, neutral=neutral)
    acc = probe_accuracies(model, train, test, layers, direction.vector)
    ablation_png(acc, images / "steer-ablation.png", layer)
    print(f"\nablation of the layer-{layer} sentiment direction from every residual write:")
    print(f"{'layer':>5} {'probe clean':>12} {'same probe, ablated':>20} {'retrained, ablated':>19}")
    for l in layers:
        r = acc[l]
        print(f"{l:>5} {r['clean']:12.3f} {r['clean_probe_on_ablated']:20.3f} {r['retrained_on_ablated']:19.3f}")
    print(f"ablation_layer={layer}")
    print(f"ablation_behaviour_before={abl.behaviour_before:.3f}")
    print(f"ablation_behaviour_after={abl.behaviour_after:.3f}")
    print(f"ablation_kl={abl.kl:.4f}")
    print(f"ablation_loss_change={abl.loss_change:.4f}")
    print(f"ablation_probe_clean_max={max(r['clean'] for r in acc.values()):.3f}")
    print(f"ablation_probe_after_max={max(r['clean_probe_on_ablated'] for r in acc.values()):.3f}")
    print(f"ablation_probe_retrained_max={max(r['retrained_on_ablated'] for r in acc.values()):.3f}")
    print(f"wall_s={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
