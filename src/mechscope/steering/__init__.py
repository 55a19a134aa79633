"""Steering: concept directions added to (or projected out of) the residual stream, and what that does.

vectors.py: `SteeringVector` (save/load) from ActAdd, CAA, a probe direction or a dictionary decoder row;
apply.py: `steered(model, vector, alpha, positions)` and `generate`; ablation.py: `ablated(model, r)`,
directional ablation of every residual write; measure.py: behaviour and side effects against alpha.
"""

from .ablation import ablated, residual_writes
from .apply import continuation, generate, steered
from .vectors import SteeringError, SteeringVector, actadd, caa, caa_many, from_decoder_row, from_direction

__all__ = ["SteeringError", "SteeringVector", "ablated", "actadd", "caa", "caa_many", "continuation",
           "from_decoder_row", "from_direction", "generate", "residual_writes", "steered"]
