"""mechscope: a workbench for mechanistic interpretability.

>>> import mechscope
>>> model = mechscope.load_model("smollm2-135m")   # a TransformerLens TransformerBridge
"""

from .errors import MechscopeError
from .models import DEFAULT_MODEL, REGISTRY, load_model, model_summary

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "REGISTRY", "MechscopeError", "load_model", "model_summary"]
