"""Sparse dictionaries over a model's activations (method.md §11): SAEs of several architectures,
transcoders and crosscoders; one `Dictionary` object per trained dictionary, saved as safetensors
plus a JSON config; `ActivationBuffer` streams a model's activations for training; `train` fits a
dictionary to a stream of activation batches, `evaluate` measures L0, FVU, dead latents and latent
densities; `interop` reads SAELens and sparsify directories and writes SAELens' layout; `splice` runs
dictionaries inside the model's forward pass (their latents and error terms as hook points) and
`measure` gives their cost to the model's predictions (CE loss recovered, KL)."""

from .activations import ActivationBuffer, for_dictionary, training_tokens
from .dashboard import DashboardConfig, Dashboards, compute_dashboards
from .dictionary import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError
from .features import LatentScores, attribute_latents, feature_curve, top_features
from .interop import export_saelens, load_any, load_saelens, load_sparsify, load_sparsify_run
from .measure import SpliceMetrics, measure
from .metrics import LatentStats, evaluate, fvu, l0
from .splice import Splice, splice
from .training import TrainResult, train

__all__ = ["ARCHITECTURES", "ActivationBuffer", "DashboardConfig", "Dashboards", "Dictionary", "DictionaryConfig", "DictionaryError", "LatentScores", "LatentStats",
           "Splice", "SpliceMetrics", "TrainResult", "attribute_latents", "compute_dashboards", "evaluate", "export_saelens", "feature_curve", "for_dictionary", "fvu", "l0",
           "load_any", "load_saelens", "load_sparsify", "load_sparsify_run", "measure", "splice", "top_features", "train",
           "training_tokens"]
