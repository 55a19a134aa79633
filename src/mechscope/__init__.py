"""mechscope: a workbench for mechanistic interpretability.

>>> import mechscope
>>> model = mechscope.load_model("smollm2-135m")   # a TransformerLens TransformerBridge
>>> scores = mechscope.attribute(model, dataset, method="eap-ig")
>>> result = mechscope.evaluate(model, scores.top_n(500), held_out)
>>> spans = mechscope.attribute(model, dataset, method="peap")   # position-aware, over the schema
>>> result = mechscope.evaluate(model, spans.greedy(5000), held_out)  # a SpanCircuit
"""

from .attribution import attribute
from .attribution.scores import EdgeScores
from .circuits.circuit import Circuit
from .data import PromptPairDataset, Schema
from .errors import MechscopeError
from .circuits.evaluation import evaluate, faithfulness_curve
from .graph import Graph
from .models import DEFAULT_MODEL, REGISTRY, load_model, model_summary
from .circuits.span_circuit import SpanCircuit, load_any_circuit

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "Circuit",
    "EdgeScores",
    "Graph",
    "MechscopeError",
    "PromptPairDataset",
    "Schema",
    "SpanCircuit",
    "attribute",
    "evaluate",
    "faithfulness_curve",
    "load_any_circuit",
    "load_model",
    "model_summary",
]
