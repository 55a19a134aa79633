"""mechscope: a workbench for mechanistic interpretability.

>>> import mechscope
>>> model = mechscope.load_model("smollm2-135m")   # a TransformerLens TransformerBridge
>>> scores = mechscope.attribute(model, dataset, method="eap-ig")
>>> result = mechscope.evaluate(model, scores.top_n(500), held_out)
"""

from .attribution import attribute
from .attribution.scores import EdgeScores
from .circuits import Circuit
from .data import PromptPairDataset, Schema
from .errors import MechscopeError
from .evaluation import evaluate, faithfulness_curve
from .graph import Graph
from .models import DEFAULT_MODEL, REGISTRY, load_model, model_summary

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
    "attribute",
    "evaluate",
    "faithfulness_curve",
    "load_model",
    "model_summary",
]
