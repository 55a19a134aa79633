"""Per-layer probing of a concept: one `collect` for every hook point, then at each point a linear probe,
its control task and selectivity, sparse probes (L1 and top-k neurons) and CCS, all scored on held-out
texts. Probes are saved with the model's fingerprint and refused by another model.

    study = probe_layers(model, make_concept("sentiment", model.tokenizer))
    study.rows[l]["accuracy"], study.rows[l]["selectivity"], study.rows[l]["ccs_mean"]
    save_probes("probes/", study.probes, model)          # probes.safetensors + probes.json
    probes = load_probes("probes/", model)               # refused for another model, naming the path
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..devices import HOST, model_device
from ..errors import check_count
from ..fileio import OutputError, atomic_dir
from .activations import ActivationError, check_hook_points, collect, resid_points
from .ccs import fit_ccs, orient_pairs
from .concepts import ConceptSet
from .linear import Probe, ProbeError, check_labels, control_labels, fit_probe

FORMAT = 1
_RESID_LIKE = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed")


@dataclass
class ProbeStudy:
    """Per-hook-point results (`rows`, one dict per point) and the fitted linear probes."""

    concept: str
    model: str
    fingerprint: str
    position: int | str
    rows: list[dict]
    probes: dict[str, Probe] = field(repr=False)
    n_train: int = 0
    n_test: int = 0
    behaviour: dict | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def hook_points(self) -> list[str]:
        return [r["hook_point"] for r in self.rows]

    def best(self, key: str = "accuracy") -> dict:
        return max(self.rows, key=lambda r: -1 if r.get(key) is None else r[key])

    def summary(self) -> dict:
        return {"concept": self.concept, "model": self.model, "fingerprint": self.fingerprint,
                "position": self.position, "n_train": self.n_train, "n_test": self.n_test,
                "behaviour": self.behaviour, "seconds": self.seconds, "rows": self.rows,
                "best_layer": self.best()["hook_point"], "best_selectivity": self.best("selectivity")["hook_point"]}


def _pair_sides(concept: ConceptSet, seed: int):
    a, b, truth = orient_pairs(concept.pairs, seed)
    return a, b, truth


def probe_layers(model, concept: ConceptSet, hook_points: Sequence[str] | None = None, position: int | str = "last", *,
                 test_fraction: float = 0.3, seed: int = 0, l2: float = 1.0, l1: float = 0.01, k: int = 16,
                 sparse: bool = True, control: bool = True, ccs_seeds: int = 5, ccs_steps: int = 1000,
                 batch_size: int | None = None, progress: bool = True) -> ProbeStudy:
    """Probe `concept` at every hook point (default: every layer's residual stream) at `position`,
    reading all of them in one forward pass per batch. Per point: held-out accuracy of the L2 probe (and
    its pair accuracy: how often it ranks the label-1 text of a held-out contrast pair above the other,
    the comparison CCS makes),
    control-task accuracy and selectivity (= accuracy - control accuracy), the L1 and top-`k` probes'
    accuracy, and CCS accuracy over `ccs_seeds` seeds (0 skips CCS; it also needs contrast pairs)."""
    from ..lens.text import model_fingerprint

    points = check_hook_points(model, resid_points(model) if hook_points is None else hook_points)
    check_labels(concept.labels, len(concept), what=f"the labels of concept {concept.name!r}")
    check_count("ccs_seeds", ccs_seeds, 0)
    train, test = concept.split(test_fraction, seed)
    t0 = time.perf_counter()
    acts = collect(model, train.texts + test.texts, points, position=position, batch_size=batch_size, progress=progress)
    t_collect = time.perf_counter() - t0
    n_tr = len(train)
    y_tr, y_te = torch.tensor(train.labels, device=HOST), torch.tensor(test.labels, device=HOST)
    ctrl = None
    if control:
        full = control_labels(train.word_types + test.word_types, seed)
        c_tr, c_te = full[:n_tr], full[n_tr:]
        if len(set(c_tr)) == 2:
            ctrl = (torch.tensor(c_tr, device=HOST), torch.tensor(c_te, device=HOST))
    use_ccs = ccs_seeds > 0 and len(train.pairs) >= 2 and len(test.pairs) >= 1
    if use_ccs:
        tr_a, tr_b, _ = _pair_sides(train, seed)
        te_a, te_b, te_truth = _pair_sides(test, seed + 1)
    rows, probes = [], {}
    t0 = time.perf_counter()
    for point in points:
        x = acts[point]
        x_tr, x_te = x[:n_tr], x[n_tr:]
        probe = fit_probe(x_tr, y_tr, point, "linear", l2=l2)
        acc = probe.accuracy(x_te, y_te)
        probe.metrics.update(accuracy=acc)
        row = {"hook_point": point, "layer": _layer(point), "accuracy": acc,
               "train_accuracy": probe.metrics["train_accuracy"]}
        if test.pairs:  # the supervised probe judged as CCS is: which text of each held-out pair is label 1
            score = probe.logits(x_te)
            row["pair_accuracy"] = float(sum(float(score[a] > score[b]) for a, b in test.pairs) / len(test.pairs))
        if ctrl is not None:
            cprobe = fit_probe(x_tr, ctrl[0], point, "linear", l2=l2)
            row["control_accuracy"] = cprobe.accuracy(x_te, ctrl[1])
            row["selectivity"] = acc - row["control_accuracy"]
            probe.metrics.update(control_accuracy=row["control_accuracy"], selectivity=row["selectivity"])
        if sparse:
            p1 = fit_probe(x_tr, y_tr, point, "l1", l1=l1)
            pk = fit_probe(x_tr, y_tr, point, "topk", l2=l2, k=k)
            row.update(l1_accuracy=p1.accuracy(x_te, y_te), l1_nonzero=p1.sparsity,
                       topk_accuracy=pk.accuracy(x_te, y_te), topk_k=pk.sparsity)
        if use_ccs:
            res = fit_ccs(x_tr[tr_a], x_tr[tr_b], x_te[te_a], x_te[te_b], te_truth, seeds=ccs_seeds, steps=ccs_steps)
            row.update(res.summary())
        rows.append(row)
        probes[point] = probe
    t_fit = time.perf_counter() - t0
    behaviour = None
    if concept.behaviour is not None:
        scores = concept.behaviour.measure(model, batch_size=batch_size)
        behaviour = {"mean_score": float(scores.mean()), "accuracy": concept.behaviour.accuracy(scores),
                     "n_prompts": len(scores), "positive_words": concept.behaviour.positive_words,
                     "negative_words": concept.behaviour.negative_words}
    name = getattr(model, "mechscope_name", None) or model.cfg.model_name
    return ProbeStudy(concept.name, str(name), model_fingerprint(model), position, rows, probes, n_tr, len(test),
                      behaviour, {"collect": t_collect, "fit": t_fit})


def _layer(point: str) -> int | None:
    parts = point.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


# --- directions --------------------------------------------------------------------------------------

def activation_shape(model, hook_point: str) -> tuple[int, ...]:
    """The shape of one position's activation at `hook_point` (ActivationError for an unknown point)."""
    check_hook_points(model, [hook_point])
    if hook_point.rsplit(".", 1)[-1] in _RESID_LIKE:
        return (model.cfg.d_model,)
    return tuple(collect(model, ["a"], [hook_point], progress=False)[hook_point].shape[1:])


def check_direction(model, hook_point: str, direction: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """`direction` checked against the activation at `hook_point` (ProbeError naming both shapes if it
    does not fit), as a float32 tensor on the model's device, scaled to unit norm when `normalise`."""
    shape = activation_shape(model, hook_point)
    if not isinstance(direction, torch.Tensor):
        direction = torch.as_tensor(direction, dtype=torch.float32, device=HOST)
    if direction.numel() != int(torch.tensor(shape, device=HOST).prod()):
        raise ProbeError(f"a direction of shape {tuple(direction.shape)} does not fit {hook_point}, whose activations "
                         f"have shape {shape}")
    d = direction.reshape(shape).to(model_device(model), torch.float32)
    if not torch.isfinite(d).all() or (normalise and d.norm() == 0):
        raise ProbeError(f"the direction for {hook_point} is zero or not finite")
    return d / d.norm() if normalise else d


# --- save / load ---------------------------------------------------------------------------------------

def save_probes(path: str | os.PathLike, probes: dict[str, Probe], model=None, *, fingerprint: str | None = None,
                meta: dict | None = None) -> Path:
    """Write `probes` to the new directory `path` (probes.safetensors: each probe's weight; probes.json:
    the format, the model's name and fingerprint, and each probe's bias, kind, neurons and metrics),
    atomically."""
    from safetensors.torch import save_file

    if not probes:
        raise ProbeError("no probes to save")
    if fingerprint is None:
        if model is None:
            raise ProbeError("save_probes needs the model (or its fingerprint) the probes were fitted on")
        from ..lens.text import model_fingerprint

        fingerprint = model_fingerprint(model)
    name = None if model is None else str(getattr(model, "mechscope_name", None) or model.cfg.model_name)
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and is not an empty directory")
    info = {"format": FORMAT, "model": name, "fingerprint": fingerprint, "meta": meta or {},
            "probes": [{"hook_point": p.hook_point, "key": f"probe{i}", "bias": p.bias, "kind": p.kind,
                        "neurons": p.neurons, "shape": list(p.shape), "metrics": p.metrics}
                       for i, p in enumerate(probes.values())]}
    tensors = {f"probe{i}": p.weight.detach().to(HOST, torch.float32).contiguous()
               for i, p in enumerate(probes.values())}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "probes.safetensors"))
        (tmp / "probes.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return out


def load_probes(path: str | os.PathLike, model=None) -> dict[str, Probe]:
    """The probes saved in `path` ({hook point: Probe}); with `model`, refused (ProbeError naming the
    path) unless they were fitted on that model."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file, weights = path / "probes.json", path / "probes.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise ProbeError(f"{path}: not a probe directory (needs probes.json and probes.safetensors)")
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (OSError, ValueError) as e:
        raise ProbeError(f"{path}: cannot be read ({e})") from None
    if info.get("format") != FORMAT:
        raise ProbeError(f"{path}: probe format {info.get('format')!r} is not {FORMAT}")
    if model is not None:
        from ..lens.text import model_fingerprint

        if info.get("fingerprint") != model_fingerprint(model):
            here = getattr(model, "mechscope_name", None) or model.cfg.model_name
            raise ProbeError(f"{path}: these probes were fitted on {info.get('model') or 'another model'} "
                             f"(fingerprint {info.get('fingerprint')}), not on {here}; refit them for this model")
    device = HOST if model is None else model_device(model)
    out = {}
    for entry in info["probes"]:
        if entry["key"] not in tensors:
            raise ProbeError(f"{path}: probes.safetensors has no tensor {entry['key']!r} for {entry['hook_point']}")
        w = tensors[entry["key"]].to(device)
        if list(w.shape) != list(entry["shape"]):
            raise ProbeError(f"{path}: the weight of {entry['hook_point']} has shape {tuple(w.shape)}, "
                             f"probes.json says {tuple(entry['shape'])}")
        out[entry["hook_point"]] = Probe(entry["hook_point"], w, float(entry["bias"]), entry["kind"],
                                         entry["neurons"], dict(entry.get("metrics") or {}))
    if model is not None:
        check_hook_points(model, list(out))
    return out


def probe_direction(path: str | os.PathLike, model, hook_point: str | None = None) -> tuple[str, torch.Tensor]:
    """(hook point, unit direction on the model's device) of a saved probe: the one at `hook_point`, or
    the probe with the best held-out accuracy."""
    probes = load_probes(path, model)
    if hook_point is None:
        hook_point = max(probes, key=lambda p: probes[p].metrics.get("accuracy", 0.0))
    if hook_point not in probes:
        raise ActivationError(f"{path}: no probe at {hook_point!r}; saved probes are at {', '.join(probes)}")
    return hook_point, check_direction(model, hook_point, probes[hook_point].direction())
