"""Circuits: graph circuits and span circuits (PEAP), their evaluation (faithfulness, curves) and the
main job that puts discovery and evaluation together (docs/method.md §5-§6)."""

from .circuit import Circuit, CircuitError
from .evaluation import evaluate, faithfulness_curve
from .span_circuit import SpanCircuit, load_any_circuit

__all__ = ["Circuit", "CircuitError", "SpanCircuit", "evaluate", "faithfulness_curve", "load_any_circuit"]
