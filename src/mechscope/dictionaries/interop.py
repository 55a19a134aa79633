"""Dictionaries saved by other tools: read SAELens and sparsify directories, write SAELens' layout.

SAELens (a directory per SAE): `cfg.json` and `sae_weights.safetensors` with W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus `threshold` [d_sae] (jumprelu), `b_gate`, `b_mag`,
`r_mag` (gated, no b_enc) and `W_skip` [d_out, d_in] (skip transcoders). Its latents are
σ((x − a·b_dec)·W_enc + b_enc) with a = `apply_b_dec_to_input`, and the output f·W_dec + b_dec. Read:
the architectures standard (ReLU, or TopK when the older `activation_fn_str` says "topk"), topk,
jumprelu, gated, transcoder, skip_transcoder and jumprelu_transcoder; both the current config (fields
under "metadata") and the older flat one (hook_name, model_name at the top). Refused, naming the file
and field: other architectures, `normalize_activations` other than "none" (its scale is not in the
directory), a `hook_head_index` (one head's slice), `finetuning_scaling_factor`,
`rescale_acts_by_decoder_norm`, and weights of other names or shapes.

sparsify (a directory per hook point, inside a run directory): `cfg.json` (d_in, num_latents or
expansion_factor, k, activation, transcode, skip_connection, ...) and `sae.safetensors` with
encoder.weight [num_latents, d_in], encoder.bias, W_dec [num_latents, d_in], b_dec [d_in] and W_skip
[d_in, d_in] with a skip connection. Its latents are the k largest of ReLU((x − b_dec)·encoderᵀ + bias)
(x itself for transcoders) and the output Σ f_i W_dec,i + b_dec (+ x·W_skipᵀ). sparsify names hook
points by Hugging Face module ("layers.15", "layers.15.mlp"): these become TransformerLens names
(blocks.15.hook_resid_post; blocks.15.hook_mlp_out, read from blocks.15.ln2.hook_out by a transcoder:
the normalised MLP input, which the bridge's blocks.15.hook_mlp_in is not: that one is resid_mid);
pass `hook_point=` for any other. Refused: activation "groupmax", `signed`, and weights of other names
or shapes.

Differences of convention are folded into the weights exactly, not approximated: mechscope always
subtracts b_dec before encoding an SAE's input (and never a transcoder's), so a file that does
otherwise gets its encoder bias shifted by b_dec·W_enc; a jumprelu threshold below 0 acts as 0 after
SAELens' ReLU, so it is stored as 0.

`export_saelens` writes a Dictionary in SAELens' current layout (relu as "standard", topk, jumprelu,
gated, transcoder, skip_transcoder, jumprelu_transcoder; batchtopk and matryoshka as what they compute
at inference: jumprelu with their threshold, or topk before one is estimated). Crosscoders and
topk-activated transcoders have no SAELens layout and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..devices import HOST
from .dictionary import Dictionary, DictionaryConfig, DictionaryError

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_DTYPES = {"float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
           "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


# ------------------------------------------------------------------------------------------------
# Shared reading
# ------------------------------------------------------------------------------------------------


def _directory(path, weights: str) -> tuple[Path, Path, Path]:
    path = Path(path)
    if not path.is_dir():
        raise DictionaryError(f"{path}: no such directory (expected a folder with cfg.json and {weights})")
    cfg, data = path / "cfg.json", path / weights
    for f in (cfg, data):
        if not f.is_file():
            raise DictionaryError(f"{path}: missing {f.name} (a directory with cfg.json and {weights} is expected)")
    return path, cfg, data


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DictionaryError(f"{file}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DictionaryError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DictionaryError(f"{file}: not a readable safetensors file ({exc})") from None


def _int_field(data: dict, name: str, file: Path, default=None, minimum: int = 1) -> int:
    value = data.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DictionaryError(f"{file}: field {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_tensors(file: Path, tensors: dict, expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise DictionaryError(f"{file}: tensors do not match {what} ({'; '.join(parts)})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise DictionaryError(f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {shape} from cfg.json")
        if not tensors[name].is_floating_point():
            raise DictionaryError(f"{file}: tensor {name} has dtype {tensors[name].dtype}, not a float type")
        if not bool(torch.isfinite(tensors[name].float()).all()):
            raise DictionaryError(f"{file}: tensor {name} holds NaN or infinite values")


def _dtype(value, file: Path) -> str:
    name = str(value or "float32").removeprefix("torch.")
    if name not in _DTYPES:
        raise DictionaryError(f"{file}: field 'dtype' is {value!r}, not a float type mechscope reads")
    return _DTYPES[name]


def _make(fields: dict, file: Path) -> DictionaryConfig:
    """A DictionaryConfig from `fields`; fields this version of DictionaryConfig lacks are refused when
    they matter (a non-default activation), dropped otherwise (notes)."""
    known = {f.name for f in dataclasses.fields(DictionaryConfig)}
    if fields.get("activation") and "activation" not in known:
        raise DictionaryError(f"{file}: a transcoder with {fields['activation']} latents is not supported here")
    kept = {k: v for k, v in fields.items() if k in known}
    try:
        return DictionaryConfig(**kept)
    except (TypeError, ValueError) as exc:
        raise DictionaryError(f"{file}: {exc}") from None


def _build(config: DictionaryConfig, tensors: dict[str, torch.Tensor], file: Path, device) -> Dictionary:
    out = Dictionary(config, device=device)
    expected = {n: tuple(t.shape) for n, t in out.state_dict().items()}
    _check_tensors(file, tensors, expected, f"a {config.architecture} dictionary")
    out.load_state_dict({n: t.to(out.dtype) for n, t in tensors.items()})
    return out.eval()


# ------------------------------------------------------------------------------------------------
# SAELens
# ------------------------------------------------------------------------------------------------

_SAELENS_ARCHS = ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder")


def _meta(cfg: dict, name: str):
    """A field of the current layout's "metadata" (or the older "meta"), else of the flat old layout."""
    for key in ("metadata", "meta"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and sub.get(name) is not None:
            return sub[name]
    return cfg.get(name)


def load_saelens(path, device=None) -> Dictionary:
    """The SAE (or transcoder) in SAELens directory `path` as a Dictionary (see the module docstring);
    DictionaryError naming the file and field for anything it cannot represent exactly."""
    path, cfg_file, weights = _directory(path, SAELENS_WEIGHTS)
    cfg = _read_json(cfg_file)
    d_in, d_sae = _int_field(cfg, "d_in", cfg_file), _int_field(cfg, "d_sae", cfg_file)
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    fn_kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch not in _SAELENS_ARCHS:
        raise DictionaryError(f"{cfg_file}: field 'architecture' is {arch!r}; mechscope reads "
                              f"{', '.join(_SAELENS_ARCHS)}")
    if arch == "standard" and fn not in ("relu", "topk"):
        raise DictionaryError(f"{cfg_file}: field 'activation_fn_str' is {fn!r}; mechscope reads relu and topk")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise DictionaryError(f"{cfg_file}: field 'normalize_activations' is {norm!r}: its input scaling is not "
                              "stored in the directory; fold it into the weights first (SAELens: "
                              "fold_activation_norm_scaling_factor) so that it reads 'none'")
    for name in ("finetuning_scaling_factor", "rescale_acts_by_decoder_norm"):
        if cfg.get(name):
            raise DictionaryError(f"{cfg_file}: field {name!r} is set; mechscope reads SAEs without it")
    if _meta(cfg, "hook_head_index") is not None:
        raise DictionaryError(f"{cfg_file}: field 'hook_head_index' is {_meta(cfg, 'hook_head_index')!r}: "
                              "SAEs of a single head's slice are not supported")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise DictionaryError(f"{cfg_file}: field 'reshape_activations' is {reshape!r}; expected none or hook_z")
    hook = _meta(cfg, "hook_name")
    if not isinstance(hook, str) or not hook:
        raise DictionaryError(f"{cfg_file}: no 'hook_name' (in 'metadata' or at the top)")
    model_name = _meta(cfg, "model_name") or ""
    transcoder = arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder")
    fields = dict(d_in=d_in, d_sae=d_sae, hook_point=hook, model_name=str(model_name),
                  dtype=_dtype(cfg.get("dtype"), cfg_file),
                  extra={"source": "saelens", "path": str(path), "architecture": arch})
    if transcoder:
        d_out = _int_field(cfg, "d_out", cfg_file)
        out_hook = _meta(cfg, "hook_name_out")
        if not isinstance(out_hook, str) or not out_hook:
            raise DictionaryError(f"{cfg_file}: a {arch} needs field 'hook_name_out'")
        if _meta(cfg, "hook_head_index_out") is not None:
            raise DictionaryError(f"{cfg_file}: field 'hook_head_index_out' is set: single-head targets are "
                                  "not supported")
        fields.update(d_out=d_out, out_hook_point=out_hook,
                      architecture="skip_transcoder" if arch == "skip_transcoder" else "transcoder",
                      activation="jumprelu" if arch == "jumprelu_transcoder" else "")
    elif arch == "topk" or (arch == "standard" and fn == "topk"):
        k = cfg.get("k", fn_kwargs.get("k"))
        fields.update(architecture="topk", k=_int_field({"k": k}, "k", cfg_file))
        if fields["k"] > d_sae:
            raise DictionaryError(f"{cfg_file}: field 'k' is {k}, more than d_sae = {d_sae}")
    else:
        fields["architecture"] = {"standard": "relu"}.get(arch, arch)
    config = _make(fields, cfg_file)

    tensors = _read_tensors(weights)
    d_out = config.d_out or d_in
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    expected.update({"b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,)} if arch == "gated"
                    else {"b_enc": (d_sae,)})
    if arch in ("jumprelu", "jumprelu_transcoder"):
        expected["threshold"] = (d_sae,)
    if arch == "skip_transcoder":
        expected["W_skip"] = (d_out, d_in)
    _check_tensors(weights, tensors, expected, f"a SAELens {arch} SAE of d_in {d_in}, d_sae {d_sae}")
    t = {n: v.to(torch.float64) for n, v in tensors.items()}  # the folds in double precision
    if "W_skip" in t:
        t["W_skip"] = t["W_skip"].T
    if "threshold" in t:
        t["threshold"] = t["threshold"].clamp_min(0)
    # mechscope subtracts b_dec before an SAE's encoder, never before a transcoder's.
    applied = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    if applied and transcoder:
        if d_out != d_in:
            raise DictionaryError(f"{cfg_file}: field 'apply_b_dec_to_input' is true but b_dec (width {d_out}) "
                                  f"cannot be subtracted from the input (width {d_in})")
        _shift_encoder(t, -t["b_dec"], arch)
    elif not applied and not transcoder:
        _shift_encoder(t, t["b_dec"], arch)
    return _build(config, {n: v.to(tensors[n].dtype) for n, v in t.items()}, weights, device)


def _shift_encoder(t: dict[str, torch.Tensor], centre: torch.Tensor, arch: str) -> None:
    """Make (x − centre)·W_enc + b' equal x·W_enc + b: b' = b + centre·W_enc (per path for gated)."""
    shift = centre @ t["W_enc"]
    if arch == "gated":
        t["b_gate"] = t["b_gate"] + shift
        t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    else:
        t["b_enc"] = t["b_enc"] + shift


def export_saelens(dictionary: Dictionary, path, overwrite: bool = False) -> Path:
    """Write `dictionary` as a SAELens directory (cfg.json + sae_weights.safetensors) at `path`,
    atomically; an existing non-empty directory is replaced only with `overwrite`."""
    from safetensors.torch import save_file

    from ..fileio import atomic_dir

    c = dictionary.config
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DictionaryError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DictionaryError(f"{path}: already exists and is not empty (pass overwrite=True to replace it)")
    state = {n: v.detach().to(HOST) for n, v in dictionary.state_dict().items()}
    sparsity = getattr(c, "sparsity", c.architecture)
    transcoder = c.architecture in ("transcoder", "skip_transcoder")
    cfg: dict = {"d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": "cpu",
                 "apply_b_dec_to_input": not transcoder, "normalize_activations": "none",
                 "reshape_activations": "hook_z" if c.hook_point.endswith("hook_z") else "none"}
    tensors = {n: state[n] for n in ("W_enc", "W_dec", "b_dec")}
    if c.architecture == "crosscoder":
        raise DictionaryError("a crosscoder has no SAELens layout (SAELens stores one hook point per SAE)")
    if transcoder:
        if sparsity not in ("relu", "jumprelu") or (c.architecture == "skip_transcoder" and sparsity != "relu"):
            raise DictionaryError(f"a {c.architecture} with {sparsity} latents has no SAELens layout "
                                  "(it has ReLU and JumpReLU transcoders and ReLU skip transcoders)")
        arch = "skip_transcoder" if c.architecture == "skip_transcoder" else \
            ("jumprelu_transcoder" if sparsity == "jumprelu" else "transcoder")
        cfg.update(d_out=c.d_out or c.d_in, hook_name_out=c.out_hook_point)
        tensors["b_enc"] = state["b_enc"]
        if "W_skip" in state:
            tensors["W_skip"] = state["W_skip"].T
        if sparsity == "jumprelu":
            tensors["threshold"] = state["threshold"]
    elif sparsity == "gated":
        arch = "gated"
        tensors.update({n: state[n] for n in ("b_gate", "b_mag", "r_mag")})
    else:
        tensors["b_enc"] = state["b_enc"]
        if sparsity == "relu":
            arch = "standard"
        elif sparsity == "jumprelu":
            arch, tensors["threshold"] = "jumprelu", state["threshold"]
        elif sparsity == "topk" or (sparsity == "batchtopk" and float(state["threshold"]) <= 0):
            arch, cfg["k"] = "topk", c.k  # batchtopk with no threshold estimated yet: per-token TopK
        elif sparsity == "batchtopk":  # at inference: one threshold for every latent
            arch = "jumprelu"
            tensors["threshold"] = torch.full((c.d_sae,), float(state["threshold"]), dtype=state["W_enc"].dtype,
                                              device=HOST)
        else:
            raise DictionaryError(f"a {c.architecture} dictionary ({sparsity} latents) has no SAELens layout")
    layer = re.match(r"blocks\.(\d+)\.", c.hook_point)
    cfg["architecture"] = arch
    cfg["metadata"] = {"model_name": c.model_name or None, "hook_name": c.hook_point, "hook_head_index": None,
                       "hook_layer": int(layer.group(1)) if layer else None, "prepend_bos": True,
                       "exported_by": "mechscope", "mechscope_architecture": c.architecture}
    # The older flat layout's names too, for readers that look there.
    cfg.update(model_name=c.model_name or None, hook_name=c.hook_point, hook_head_index=None,
               activation_fn_str="topk" if arch == "topk" else "relu",
               activation_fn_kwargs={"k": c.k} if arch == "topk" else {})
    with atomic_dir(path, error=DictionaryError, replace=overwrite) as tmp:
        save_file({n: v.contiguous() for n, v in tensors.items()}, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=1))
    return path


# ------------------------------------------------------------------------------------------------
# sparsify
# ------------------------------------------------------------------------------------------------

_HF_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)(\.mlp)?$")


def sparsify_hook_point(name: str, transcode: bool) -> tuple[str, str]:
    """(input hook point, target hook point or "") of a sparsify hook-point name such as "layers.15"
    (the residual stream after layer 15; a transcoder reads the one before it) or "layers.15.mlp" (the
    MLP's output; a transcoder reads the MLP's input, the output of the norm before it); ("", "") when
    the name is not one of these."""
    m = _HF_LAYER.match(name)
    if not m:
        return "", ""
    layer, mlp = int(m.group(1)), bool(m.group(2))
    if not mlp:  # a transcoder of a whole layer reads its input and predicts its output
        return (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post") if transcode else \
            (f"blocks.{layer}.hook_resid_post", "")
    if transcode:
        return f"blocks.{layer}.ln2.hook_out", f"blocks.{layer}.hook_mlp_out"
    return f"blocks.{layer}.hook_mlp_out", ""


def load_sparsify(path, hook_point: str | None = None, out_hook_point: str | None = None,
                  device=None) -> Dictionary:
    """The sparse coder in sparsify directory `path` (one hook point: cfg.json + sae.safetensors) as a
    Dictionary. Its hook point is taken from the directory's name (see `sparsify_hook_point`) unless
    `hook_point` (and, for transcoders, `out_hook_point`) is given."""
    path, cfg_file, weights = _directory(path, SPARSIFY_WEIGHTS)
    cfg = _read_json(cfg_file)
    d_in = _int_field(cfg, "d_in", cfg_file)
    num = cfg.get("num_latents") or 0
    d_sae = _int_field(cfg, "num_latents", cfg_file) if num else \
        d_in * _int_field(cfg, "expansion_factor", cfg_file, default=32)
    k = _int_field(cfg, "k", cfg_file, default=32)
    if k > d_sae:
        raise DictionaryError(f"{cfg_file}: field 'k' is {k}, more than the {d_sae} latents")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise DictionaryError(f"{cfg_file}: field 'activation' is {activation!r}; mechscope reads topk sparse coders")
    if cfg.get("signed"):
        raise DictionaryError(f"{cfg_file}: field 'signed' is set; mechscope reads unsigned TopK sparse coders")
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    guess_in, guess_out = sparsify_hook_point(path.name, transcode)
    hook = hook_point or guess_in
    if not hook:
        raise DictionaryError(f"{path}: cannot tell the hook point from the directory name {path.name!r}; "
                              "pass hook_point= (a TransformerLens name such as blocks.3.hook_resid_post)")
    fields = dict(d_in=d_in, d_sae=d_sae, k=k, hook_point=hook, dtype="float32",
                  extra={"source": "sparsify", "path": str(path), "hookpoint": path.name})
    if transcode or skip:
        # an SAE with a skip term writes where it reads; a transcoder's target comes from the name
        target = out_hook_point or (hook if not transcode else (guess_out if hook_point is None else ""))
        if not target:
            raise DictionaryError(f"{path}: a transcoder needs its target: pass out_hook_point=")
        fields.update(architecture="skip_transcoder" if skip else "transcoder", d_out=d_in, out_hook_point=target,
                      activation="topk")
    else:
        fields["architecture"] = "topk"
    config = _make(fields, cfg_file)

    tensors = _read_tensors(weights)
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    _check_tensors(weights, tensors, expected, f"a sparsify sparse coder of d_in {d_in}, {d_sae} latents")
    dtype = tensors["W_dec"].dtype
    t = {"W_enc": tensors["encoder.weight"].T.to(torch.float64), "b_enc": tensors["encoder.bias"].to(torch.float64),
         "W_dec": tensors["W_dec"].to(torch.float64), "b_dec": tensors["b_dec"].to(torch.float64)}
    if skip:
        t["W_skip"] = tensors["W_skip"].T.to(torch.float64)
        if not transcode:  # an SAE with a skip term: centred input, which a skip transcoder does not do
            _shift_encoder(t, -t["b_dec"], "topk")
    if dtype != torch.float32:
        config = _make({**fields, "dtype": _dtype(str(dtype), weights)}, cfg_file)
    return _build(config, {n: v.to(dtype) for n, v in t.items()}, weights, device)


def load_sparsify_run(path, device=None) -> dict[str, Dictionary]:
    """{hook-point directory name: Dictionary} of every hook point in a sparsify run directory."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryError(f"{path}: no such directory")
    found = sorted((d for d in path.iterdir() if (d / SPARSIFY_WEIGHTS).is_file()),
                   key=lambda d: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", d.name)])
    if not found:
        raise DictionaryError(f"{path}: no hook-point directories with {SPARSIFY_CONFIG} and {SPARSIFY_WEIGHTS}")
    return {d.name: load_sparsify(d, device=device) for d in found}


# ------------------------------------------------------------------------------------------------
# Any directory
# ------------------------------------------------------------------------------------------------


def load_any(path, device=None) -> Dictionary:
    """A dictionary directory of any known layout: mechscope's own, SAELens' or sparsify's."""
    path = Path(path)
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, device=device)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify(path, device=device)
    return Dictionary.load(path, device=device)

