"""A sparse dictionary over a model's activations (method.md §11): one object for every architecture.

For activations x at a hook point, latents f = σ(W_enc·(x − b_dec) + b_enc) and the reconstruction
x̂ = W_dec·f + b_dec. The architectures differ in σ and in what they read and write:

- relu: σ = ReLU (trained with an L1 penalty weighted by each decoder row's norm);
- topk: the k largest pre-activations of each token are kept (ReLU'd), the rest zeroed;
- batchtopk: in training the k·batch largest over the whole batch; at inference a single threshold,
  estimated during training, decides each latent (the `threshold` buffer; until one is estimated,
  inference falls back to per-token TopK);
- jumprelu: f_i = z_i·H(z_i − θ_i) with learned per-latent thresholds θ (`threshold`);
- gated: a gate path (W_enc, b_gate) decides which latents fire, a magnitude path (W_enc scaled by
  exp(r_mag), b_mag) how strongly;
- matryoshka: a TopK / BatchTopK dictionary whose nested prefixes (`prefixes`) are each trained to
  reconstruct on their own;
- transcoder: reads one hook point (the MLP's input) and writes another (the MLP's output), so
  d_out may differ from d_in and no b_dec is subtracted on the way in; skip_transcoder adds a linear
  skip term x·W_skip;
- crosscoder: reads and writes several hook points at once, x of shape [..., n_hooks, d_in].

Transcoders and crosscoders take their sparsity from `activation` (relu, topk, batchtopk or
jumprelu); matryoshka from `activation` too (topk or batchtopk).

A dictionary is saved as a directory with `dictionary.safetensors` and `config.json`, written
atomically; `Dictionary.load` refuses anything else with the path in the message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..devices import HOST
from ..errors import MechscopeError

FORMAT = "mechscope.dictionary"
FORMAT_VERSION = 1
WEIGHTS = "dictionary.safetensors"
CONFIG = "config.json"

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "transcoder",
                 "skip_transcoder", "crosscoder")
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class DictionaryError(MechscopeError, ValueError):
    """A dictionary configuration that cannot be built, a file that is not a dictionary of ours, or
    activations whose width does not fit it; the message names the field, file or hook point."""


@dataclass
class DictionaryConfig:
    architecture: str            # one of ARCHITECTURES
    d_in: int                    # width of the activation read (per hook point)
    d_sae: int                   # number of latents
    hook_point: str              # TransformerLens name it reads, e.g. "blocks.15.hook_resid_post"
    d_out: int = 0               # 0: = d_in (SAEs); transcoders: the width of the target
    out_hook_point: str = ""     # transcoders: the target's hook point (e.g. "blocks.3.hook_mlp_out")
    hook_points: tuple[str, ...] = ()   # crosscoders: every hook point read (and written), in order
    k: int = 0                   # topk / batchtopk / matryoshka (and transcoders/crosscoders using topk)
    model_name: str = ""         # the model it was trained on (name) and its fingerprint
    model_fingerprint: str = ""  # (mechscope.lens.text.model_fingerprint); "" for foreign files
    dtype: str = "float32"
    # Sparsity of transcoders and crosscoders (relu, topk, batchtopk, jumprelu) and of matryoshka
    # (topk, batchtopk); "" = the default (relu; batchtopk for matryoshka). Ignored by the others.
    activation: str = ""
    l1_coefficient: float = 5.0  # relu, gated and relu-activated transcoders/crosscoders: the L1 weight
    l0_coefficient: float = 1.0  # jumprelu: the weight of the L0 penalty
    jumprelu_bandwidth: float = 0.001   # jumprelu: width ε of the rectangle kernel of the STEs
    threshold_init: float = 0.001       # jumprelu: the thresholds' starting value
    aux_k: int = 0               # topk-style: latents AuxK reconstructs the residual with (0: d_in // 2)
    aux_coefficient: float = 1 / 32     # topk-style: the weight of the AuxK loss
    prefixes: tuple[int, ...] = ()      # matryoshka: nested prefix sizes, increasing, the last = d_sae
    threshold_momentum: float = 0.99    # batchtopk: the running estimate's momentum
    extra: dict = field(default_factory=dict)  # free-form notes (where it came from, training settings)

    def __post_init__(self):
        self.hook_points = tuple(self.hook_points)
        self.prefixes = tuple(int(p) for p in self.prefixes)
        self.validate()

    # -- derived properties ---------------------------------------------------------------------
    @property
    def out_width(self) -> int:
        return self.d_out or self.d_in

    @property
    def n_hooks(self) -> int:
        return len(self.hook_points) if self.architecture == "crosscoder" else 1

    @property
    def sparsity(self) -> str:
        """The activation that makes the latents sparse: relu, topk, batchtopk, jumprelu or gated."""
        if self.architecture in ("relu", "topk", "batchtopk", "jumprelu", "gated"):
            return self.architecture
        if self.architecture == "matryoshka":
            return self.activation or "batchtopk"
        return self.activation or "relu"

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in ("transcoder", "skip_transcoder")

    @property
    def decoder_norm(self) -> str:
        """'penalty': decoder norms are folded into the L1 penalty (relu, and relu-activated
        transcoders/crosscoders: the penalty f_i·‖W_dec,i‖ is unchanged by rescaling a latent, so the
        norms may float); 'unit': decoder rows are kept at unit norm (the others; gated too, whose
        magnitude path could otherwise shrink the decoder to open every gate at no cost)."""
        return "penalty" if self.sparsity == "relu" else "unit"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        def bad(message):
            raise DictionaryError(f"dictionary config: {message}")

        if self.architecture not in ARCHITECTURES:
            bad(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 0:
            bad(f"d_out must be 0 (= d_in) or a positive integer, got {self.d_out!r}")
        if self.d_out and self.d_out != self.d_in and not self.is_transcoder:
            bad(f"d_out {self.d_out} differs from d_in {self.d_in}; only transcoders write another width")
        if self.dtype not in DTYPES:
            bad(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if not isinstance(self.hook_point, str):
            bad(f"hook_point must be a string, got {self.hook_point!r}")
        if self.is_transcoder and not self.out_hook_point:
            bad(f"a {self.architecture} needs out_hook_point (the hook point it writes)")
        if self.architecture == "crosscoder":
            if len(self.hook_points) < 1:
                bad("a crosscoder needs hook_points (every hook point it reads and writes)")
            if len(set(self.hook_points)) != len(self.hook_points):
                bad(f"hook_points repeat a name: {list(self.hook_points)}")
        if self.activation and self.architecture in ("matryoshka",) and self.activation not in ("topk", "batchtopk"):
            bad(f"matryoshka's activation must be topk or batchtopk, got {self.activation!r}")
        if self.activation and self.activation not in ACTIVATIONS:
            bad(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.sparsity in ("topk", "batchtopk"):
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                bad(f"{self.sparsity} needs k between 1 and d_sae={self.d_sae}, got {self.k!r}")
        if self.architecture == "matryoshka":
            p = self.prefixes
            if not p or any(b <= a for a, b in zip(p, p[1:])) or p[0] < 1 or p[-1] != self.d_sae:
                bad(f"matryoshka prefixes must increase from >= 1 to d_sae={self.d_sae}, got {list(p)}")
        if self.aux_k < 0:
            bad(f"aux_k must be >= 0, got {self.aux_k}")
        if self.jumprelu_bandwidth <= 0 or self.threshold_init <= 0:
            bad("jumprelu_bandwidth and threshold_init must be positive")
        if not 0 <= self.threshold_momentum < 1:
            bad(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["hook_points"] = list(self.hook_points)
        data["prefixes"] = list(self.prefixes)
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = "config") -> "DictionaryConfig":
        if not isinstance(data, dict):
            raise DictionaryError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DictionaryError(f"{where}: unknown field(s) {', '.join(unknown)}")
        missing = [n for n in ("architecture", "d_in", "d_sae", "hook_point") if n not in data]
        if missing:
            raise DictionaryError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**data)
        except DictionaryError as exc:
            raise DictionaryError(f"{where}: {str(exc).removeprefix('dictionary config: ')}") from None
        except TypeError as exc:
            raise DictionaryError(f"{where}: {exc}") from None


# -- straight-through estimators (JumpReLU) ----------------------------------------------------------
def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _Step(torch.autograd.Function):
    """H(z − θ); its θ-gradient is the pseudo-derivative −K((z − θ)/ε)/ε (rectangle kernel K), which
    is the central finite difference of the step in θ with width ε; z gets no gradient."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        d_threshold = -_rectangle((z - threshold) / eps) / eps * grad
        return None, _sum_to(d_threshold, threshold.shape), None


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); z's gradient is H(z − θ), θ's the pseudo-derivative −(θ/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        d_z = (z > threshold).to(z.dtype) * grad
        d_threshold = -(threshold / eps) * _rectangle((z - threshold) / eps) * grad
        return d_z, _sum_to(d_threshold, threshold.shape), None


def _sum_to(t: Tensor, shape) -> Tensor:
    return t.reshape(-1, *shape).sum(0) if t.dim() > len(shape) else t


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(z, threshold, bandwidth)


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z, threshold, bandwidth)


def topk_mask(values: Tensor, k: int) -> Tensor:
    """values with all but the k largest of each row (last dim) set to zero, then ReLU'd."""
    top, index = values.topk(k, dim=-1)
    return torch.zeros_like(values).scatter(-1, index, top.relu())


def batch_topk(values: Tensor, k: int) -> Tensor:
    """values [..., d_sae] keeping the k·n_tokens largest over the whole batch (then ReLU'd)."""
    flat = values.reshape(-1)
    n_tokens = flat.numel() // values.shape[-1]
    top, index = flat.topk(min(k * n_tokens, flat.numel()))
    return torch.zeros_like(flat).scatter(0, index, top.relu()).reshape(values.shape)


class Dictionary(nn.Module):
    """A sparse dictionary (see the module's docstring). Created with zero weights on `device`;
    `init_weights(seed)` draws a starting point. It starts in eval mode; `.training` (nn.Module's
    train()/eval()) decides whether BatchTopK selects over the batch (training) or by its estimated
    threshold (eval)."""

    def __init__(self, config: DictionaryConfig, device=None):
        super().__init__()
        if not isinstance(config, DictionaryConfig):
            raise DictionaryError(f"expected a DictionaryConfig, got {type(config).__name__}")
        config.validate()
        self.config = dataclasses.replace(config)  # its own copy: training may adapt fields (target_l0)
        c = config
        kw = dict(device=torch.device(device) if device is not None else HOST, dtype=c.torch_dtype)
        h, d_in, d_sae, d_out = c.n_hooks, c.d_in, c.d_sae, c.out_width
        crosscoder = c.architecture == "crosscoder"
        self.W_enc = nn.Parameter(torch.zeros(*((h,) if crosscoder else ()), d_in, d_sae, **kw))
        if c.sparsity != "gated":
            self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, *((h,) if crosscoder else ()), d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(*((h,) if crosscoder else ()), d_out, **kw))
        if c.sparsity == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), c.threshold_init, **kw))
        if c.sparsity == "batchtopk":
            # The inference threshold, estimated in training; 0 = not estimated yet.
            self.register_buffer("threshold", torch.zeros((), **kw))
        if c.sparsity == "gated":
            self.r_mag = nn.Parameter(torch.zeros(d_sae, **kw))
            self.b_gate = nn.Parameter(torch.zeros(d_sae, **kw))
            self.b_mag = nn.Parameter(torch.zeros(d_sae, **kw))
        if c.architecture == "skip_transcoder":
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, **kw))
        self.eval()  # an inference object until training says otherwise

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def decoder_norms(self) -> Tensor:
        """‖W_dec,i‖ per latent [d_sae] (a crosscoder's summed over its hook points)."""
        if self.config.architecture == "crosscoder":
            return self.W_dec.norm(dim=-1).sum(-1)
        return self.W_dec.norm(dim=-1)

    def state_names(self) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of everything saved."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, decoder_norm: float | None = None) -> "Dictionary":
        """A seeded starting point, the same on every device (drawn on the host): decoder rows in random
        directions of norm `decoder_norm` (default 1; 0.1 where norms enter the penalty), the encoder
        its transpose, biases zero, thresholds at their initial value."""
        c = self.config
        gen = torch.Generator(device=HOST).manual_seed(int(seed))
        shape = tuple(self.W_dec.shape)
        w = torch.randn(shape, generator=gen, dtype=torch.float32, device=HOST)
        norm = decoder_norm if decoder_norm is not None else (0.1 if c.decoder_norm == "penalty" else 1.0)
        w = w / w.reshape(shape[0], -1).norm(dim=-1).reshape(-1, *([1] * (w.dim() - 1))) * norm
        self.W_dec.copy_(w)
        if c.is_transcoder:  # reads another space than it writes: an independent encoder
            enc = torch.randn(tuple(self.W_enc.shape), generator=gen, dtype=torch.float32, device=HOST)
            self.W_enc.copy_(enc / c.d_in ** 0.5)
        elif c.architecture == "crosscoder":
            self.W_enc.copy_(w.permute(1, 2, 0))
        else:
            self.W_enc.copy_(w.T)
        for name, value in self.named_parameters():
            if name.startswith("b_") or name in ("r_mag", "W_skip"):
                value.zero_()
        if c.sparsity == "jumprelu":
            self.threshold.fill_(c.threshold_init)
        if c.sparsity == "batchtopk":
            self.threshold.zero_()
        return self

    # -- the maps ----------------------------------------------------------------------------------
    def check_input(self, x: Tensor, what: str = "activations") -> None:
        c = self.config
        if c.architecture == "crosscoder":
            if x.dim() < 2 or tuple(x.shape[-2:]) != (c.n_hooks, c.d_in):
                raise DictionaryError(
                    f"{what} of shape {tuple(x.shape)} do not fit this crosscoder of {c.hook_point or 'its hooks'}:"
                    f" it reads [..., {c.n_hooks}, {c.d_in}] ({c.n_hooks} hook points of width {c.d_in})")
        elif x.dim() < 1 or x.shape[-1] != c.d_in:
            raise DictionaryError(f"{what} of width {x.shape[-1] if x.dim() else 'scalar'} do not fit this "
                                  f"{c.architecture} dictionary of {c.hook_point}: it reads width {c.d_in}")

    def pre_activations(self, x: Tensor) -> Tensor:
        """W_enc·(x − b_dec) + b_enc (transcoders: W_enc·x + b_enc; gated: the gate's pre-activation)."""
        c = self.config
        bias = self.b_gate if c.sparsity == "gated" else self.b_enc
        if c.architecture == "crosscoder":
            return torch.einsum("...hd,hds->...s", x - self.b_dec, self.W_enc) + bias
        centred = x if c.is_transcoder else x - self.b_dec
        return centred @ self.W_enc + bias

    def _gated_magnitude(self, x: Tensor) -> Tensor:
        centred = x if self.config.is_transcoder else x - self.b_dec
        return (centred @ self.W_enc) * self.r_mag.exp() + self.b_mag

    def activate(self, pre: Tensor, x: Tensor | None = None) -> Tensor:
        """The latents from pre-activations (gated needs x for its magnitude path)."""
        c = self.config
        kind = c.sparsity
        if kind == "relu":
            return pre.relu()
        if kind == "topk":
            return topk_mask(pre, c.k)
        if kind == "batchtopk":
            if self.training:
                return batch_topk(pre, c.k)
            if float(self.threshold) <= 0:  # no threshold estimated yet: per-token TopK
                return topk_mask(pre, c.k)
            return pre * (pre > self.threshold).to(pre.dtype)
        if kind == "jumprelu":
            return jumprelu(pre, self.threshold, c.jumprelu_bandwidth)
        if kind == "gated":
            return (pre > 0).to(pre.dtype) * self._gated_magnitude(x).relu()
        raise AssertionError(kind)

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] (crosscoder [..., n_hooks, d_in]) -> latents [..., d_sae]."""
        self.check_input(x)
        x = x.to(self.dtype)
        return self.activate(self.pre_activations(x), x)

    def decode(self, f: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_out] (crosscoder [..., n_hooks, d_out]); without the skip term."""
        if f.shape[-1] != self.config.d_sae:
            raise DictionaryError(f"latents of width {f.shape[-1]} do not fit this dictionary of "
                                  f"{self.config.d_sae} latents")
        f = f.to(self.dtype)
        if self.config.architecture == "crosscoder":
            return torch.einsum("...s,shd->...hd", f, self.W_dec) + self.b_dec
        return f @ self.W_dec + self.b_dec

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip transcoder's linear term x·W_skip (None for the others)."""
        if self.config.architecture != "skip_transcoder":
            return None
        return x.to(self.dtype) @ self.W_skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        skip = self.skip(x)
        return out if skip is None else out + skip

    # -- files -------------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> Path:
        """Write the directory `path` (dictionary.safetensors + config.json) atomically; an existing
        non-empty directory is replaced only with `overwrite`."""
        from ..fileio import atomic_dir

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DictionaryError(f"{path}: exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise DictionaryError(f"{path}: already exists and is not empty (pass overwrite=True to replace it)")
        with atomic_dir(path, error=DictionaryError, replace=overwrite) as tmp:
            self.write_files(tmp)
        return path

    def write_files(self, folder: Path) -> None:
        """Write dictionary.safetensors and config.json into the (temporary) folder `folder`."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().to(HOST).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        (folder / CONFIG).write_text(json.dumps(
            {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.to_json()}, indent=1))

    @classmethod
    def load(cls, path, device=None) -> "Dictionary":
        """The dictionary saved in directory `path`; anything else (a missing, corrupt or foreign file,
        tensors of other names or shapes) raises DictionaryError naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise DictionaryError(f"{path}: no such dictionary directory")
        if not path.is_dir():
            raise DictionaryError(f"{path}: not a dictionary directory (expected a folder with {WEIGHTS} and {CONFIG})")
        cfg_file, weights = path / CONFIG, path / WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            hint = ""
            if (path / "cfg.json").is_file():
                hint = " (it looks like a SAELens or sparsify directory: read it with mechscope.dictionaries.interop)"
            missing = CONFIG if not cfg_file.is_file() else WEIGHTS
            raise DictionaryError(f"{path}: not a mechscope dictionary, no {missing}{hint}")
        try:
            data = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DictionaryError(f"{cfg_file}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DictionaryError(f"{cfg_file}: not a mechscope dictionary config (no \"format\": \"{FORMAT}\")")
        if data.get("version") != FORMAT_VERSION:
            raise DictionaryError(f"{cfg_file}: dictionary format version {data.get('version')!r} is not "
                                  f"{FORMAT_VERSION}, the one this mechscope reads")
        config = DictionaryConfig.from_json(data.get("config"), where=str(cfg_file))
        try:
            tensors = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DictionaryError(f"{weights}: not a readable safetensors file ({exc})") from None
        out = cls(config, device=device)
        expected = out.state_names()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
            raise DictionaryError(f"{weights}: tensors do not match a {config.architecture} dictionary "
                                  f"({'; '.join(parts)})")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise DictionaryError(f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the config says {shape}")
        out.load_state_dict({n: t.to(out.dtype) for n, t in tensors.items()})
        return out

    # -- models ------------------------------------------------------------------------------------
    def hook_widths(self) -> dict[str, int]:
        """{hook point: the width this dictionary expects there}."""
        c = self.config
        if c.architecture == "crosscoder":
            return {p: c.d_in for p in c.hook_points}
        widths = {c.hook_point: c.d_in}
        if c.is_transcoder:
            widths[c.out_hook_point] = c.out_width
        return widths

    def check_model(self, model) -> None:
        """DictionaryError unless the model's activations at the dictionary's hook points have the
        widths it reads and writes (one forward of two tokens; an unknown hook point lists known ones)."""
        from ..probes.activations import ActivationError, check_hook_points

        widths = self.hook_widths()
        try:
            check_hook_points(model, list(widths))
        except ActivationError as exc:
            raise DictionaryError(str(exc)) from None
        got = _model_widths(model, list(widths))
        for point, width in widths.items():
            if got[point] != width:
                raise DictionaryError(
                    f"this {self.config.architecture} dictionary expects width {width} at {point}, but "
                    f"{getattr(model.cfg, 'model_name', 'the model')} has width {got[point]} there")


@torch.no_grad()
def _model_widths(model, points: list[str]) -> dict[str, int]:
    """{hook point: the width of its activation, flattened past the position axis}."""
    from ..devices import model_device

    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    tokens = torch.full((1, 2), int(bos if bos is not None else 0), dtype=torch.long, device=model_device(model))
    got: dict[str, int] = {}

    def keep(name):
        def hook(act, hook):
            got[name] = int(act[0, 0].numel())
            return act
        return hook

    with model.hooks(fwd_hooks=[(p, keep(p)) for p in points]):
        model(tokens)
    return got

