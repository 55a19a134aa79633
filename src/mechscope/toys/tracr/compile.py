"""Compile RASP programs with tracr, keeping the compiler's intermediate products, and import the
result as a `CompiledTransformer`.

`compile_program` runs tracr's compilation steps one by one (RASP graph, basis inference, craft
components, craft model, assembly) instead of `compile_rasp_to_model`, so that the craft model
(which block reads and writes which labelled residual directions) stays available for the ground
truth (`ground_truth.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ...devices import HOST
from ...errors import MechscopeError
from .model import CompiledConfig, CompiledTransformer

BOS = "BOS"
PAD = "PAD"


class TracrError(MechscopeError, RuntimeError):
    """tracr is missing, or a program does not compile."""


def _import_tracr():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # tracr's own forward in float64, for the identity test
        from tracr.compiler import (
            assemble,
            basis_inference,
            craft_graph_to_model,
            craft_model_to_transformer,
            expr_to_craft_graph,
            rasp_to_graph,
            validating,
        )
        from tracr.craft import bases
        from tracr.rasp import rasp
    except ImportError as e:  # pragma: no cover - exercised only without the extra installed
        raise TracrError(
            "tracr is not installed; install mechscope's tracr extra (tracr-pypi, jax, dm-haiku): "
            "pip install -e '.[tracr]'"
        ) from e
    return dict(assemble=assemble, basis_inference=basis_inference, craft_graph_to_model=craft_graph_to_model,
                craft_model_to_transformer=craft_model_to_transformer, expr_to_craft_graph=expr_to_craft_graph,
                rasp_to_graph=rasp_to_graph, validating=validating, bases=bases, rasp=rasp)


class CompiledTokenizer:
    """Token strings <-> ids of a compiled model's input vocabulary (tracr's input encoder)."""

    def __init__(self, encoding_map: dict):
        self.encoding_map = dict(encoding_map)
        self.decoding_map = {v: k for k, v in self.encoding_map.items()}
        self.bos_token_id = self.encoding_map[BOS]
        self.pad_token_id = self.encoding_map[PAD]

    def __len__(self) -> int:
        return len(self.encoding_map)

    def get_vocab(self) -> dict[str, int]:
        return {str(k): v for k, v in self.encoding_map.items()}

    def encode(self, values) -> list[int]:
        """Program input values -> ids, BOS prepended."""
        try:
            return [self.bos_token_id] + [self.encoding_map[v] for v in values]
        except KeyError as e:
            raise ValueError(f"value {e.args[0]!r} is not in the compiled vocabulary {sorted(map(str, self.encoding_map))}") from None

    def decode(self, ids) -> str:
        return " ".join(self.convert_ids_to_tokens(ids))

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [str(self.decoding_map[int(i)]) for i in ids]


@dataclass
class CompiledProgram:
    """A compiled RASP program: the PyTorch model and what the compiler knew when building it."""

    name: str
    program: Any  # rasp.SOp
    vocab: frozenset
    max_seq_len: int
    model: CompiledTransformer
    craft_model: Any  # tracr craft SeriesWithResiduals
    module_names: list[str]  # craft block i -> "transformer/layer_{l}/attn|mlp"
    residual_labels: list[str]
    output_values: list  # output class of each logit (categorical) or [None] (numerical)
    categorical: bool
    assembled: Any = field(repr=False, default=None)  # tracr's AssembledTransformerModel

    @property
    def tokenizer(self) -> CompiledTokenizer:
        return self.model.tokenizer

    def run_program(self, values) -> list:
        """The RASP program's own output (the reference the model must reproduce)."""
        from tracr.rasp import rasp

        return rasp.evaluate(self.program, list(values))

    @torch.no_grad()
    def decode(self, logits: torch.Tensor) -> list:
        """Output values per position from [pos, d_vocab_out] logits: argmax class, or the number."""
        if self.categorical:
            return [self.output_values[int(i)] for i in logits.argmax(-1)]
        return [float(x) for x in logits[:, 0]]

    def tracr_residuals(self, values) -> list[np.ndarray]:
        """tracr's own forward pass on `values` (BOS prepended): the residual after every sublayer."""
        out = self.assembled.apply([BOS] + list(values))
        return [np.asarray(r[0]) for r in out.residuals]


def compile_program(program, vocab, max_seq_len: int, name: str = "program", dtype=torch.float64,
                    mlp_exactness: int = 100) -> CompiledProgram:
    """Compile `program` (a RASP SOp) for inputs over `vocab` of up to `max_seq_len` tokens."""
    t = _import_tracr()
    rasp, bases = t["rasp"], t["bases"]
    problems = t["validating"].static_validate(program)
    if problems:
        raise TracrError(f"{name}: tracr cannot compile " + "; ".join(f"{p.expr.name}: {p.reason}" for p in problems))
    extracted = t["rasp_to_graph"].extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    t["basis_inference"].infer_bases(graph, sink, set(vocab), max_seq_len)
    t["expr_to_craft_graph"].add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, BOS), mlp_exactness=mlp_exactness)
    craft_model = t["craft_graph_to_model"].craft_graph_to_model(graph, sources)
    assembled = t["craft_model_to_transformer"].craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=max_seq_len, causal=False,
        compiler_bos=BOS, compiler_pad=PAD)
    _, module_names = t["assemble"]._get_model_config_and_module_names(craft_model)
    model, output_values, categorical = _import_assembled(assembled, sink, name, dtype)
    return CompiledProgram(name=name, program=program, vocab=frozenset(vocab), max_seq_len=max_seq_len, model=model,
                           craft_model=craft_model, module_names=list(module_names),
                           residual_labels=list(assembled.residual_labels), output_values=output_values,
                           categorical=categorical, assembled=assembled)


def _import_assembled(assembled, sink, name: str, dtype) -> tuple[CompiledTransformer, list, bool]:
    """Copy an assembled tracr model's parameters into a `CompiledTransformer`."""
    from tracr.compiler import nodes
    from tracr.rasp import rasp

    params = {k: {kk: np.asarray(vv, dtype=np.float64) for kk, vv in v.items()} for k, v in assembled.params.items()}
    mc = assembled.model_config
    d_model = params["token_embed"]["embeddings"].shape[1]
    # The unembedding projects the residual stream onto the output SOp's directions.
    output_basis = sorted(sink[nodes.OUTPUT_BASIS])
    labels = list(assembled.residual_labels)
    w_u = np.zeros((d_model, len(output_basis)))
    for j, direction in enumerate(output_basis):
        w_u[labels.index(str(direction)), j] = 1.0
    categorical = rasp.is_categorical(sink[nodes.EXPR])
    output_values = [d.value for d in output_basis] if categorical else [None]
    cfg = CompiledConfig(
        n_layers=mc.num_layers, n_heads=mc.num_heads, d_model=d_model, d_head=mc.key_size,
        d_mlp=mc.mlp_hidden_size, d_vocab=params["token_embed"]["embeddings"].shape[0], d_vocab_out=w_u.shape[1],
        n_ctx=params["pos_embed"]["embeddings"].shape[0], model_name=f"tracr-{name}",
        attention_dir="causal" if mc.causal else "bidirectional", attn_scale=float(np.sqrt(mc.key_size)), dtype=dtype)
    tokenizer = CompiledTokenizer(assembled.input_encoder.encoding_map)
    model = CompiledTransformer(cfg, tokenizer)
    model.mechscope_name = f"tracr-{name}"
    h, e = mc.num_heads, mc.key_size
    as_t = lambda a: torch.tensor(a, dtype=dtype, device=HOST)  # noqa: E731 (compiled on the host, moved later)
    with torch.no_grad():
        model.W_E.copy_(as_t(params["token_embed"]["embeddings"]))
        model.W_pos.copy_(as_t(params["pos_embed"]["embeddings"]))
        model.W_U.copy_(as_t(w_u))
        for l, block in enumerate(model.blocks):
            p = lambda part: params[f"transformer/layer_{l}/{part}"]  # noqa: E731
            for kind, w, bias in (("query", block.attn.W_Q, block.attn.b_Q), ("key", block.attn.W_K, block.attn.b_K),
                                  ("value", block.attn.W_V, block.attn.b_V)):
                w.copy_(as_t(p(f"attn/{kind}")["w"].reshape(d_model, h, e).transpose(1, 0, 2)))
                bias.copy_(as_t(p(f"attn/{kind}")["b"].reshape(h, e)))
            block.attn.W_O.copy_(as_t(p("attn/linear")["w"].reshape(h, e, d_model)))
            block.attn.b_O.copy_(as_t(p("attn/linear")["b"]))
            if cfg.d_mlp:  # a program without MLPs compiles to an attention-only model
                block.mlp.W_in.copy_(as_t(p("mlp/linear_1")["w"]))
                block.mlp.b_in.copy_(as_t(p("mlp/linear_1")["b"]))
                block.mlp.W_out.copy_(as_t(p("mlp/linear_2")["w"]))
                block.mlp.b_out.copy_(as_t(p("mlp/linear_2")["b"]))
    return model, output_values, categorical


@dataclass(frozen=True)
class ProgramSpec:
    """A program of the benchmark (the suite's, or one a user brings with `--program module:function`):
    how to build it (a function returning the RASP SOp) and the inputs it is defined on."""

    build: Callable[[], Any]
    vocab: tuple
    max_seq_len: int
    description: str = ""
    unique_tokens: bool = False  # the program is defined on inputs without repeated tokens only
    pad_counterfactuals: bool = False  # equal-length inputs share one output: counterfactuals pad instead
