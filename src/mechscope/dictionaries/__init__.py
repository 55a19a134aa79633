"""Sparse dictionaries over a model's activations (method.md §11): SAEs of several architectures,
transcoders and crosscoders; one `Dictionary` object per trained dictionary, saved as safetensors
plus a JSON config; `ActivationBuffer` streams a model's activations for training; `train` fits a
dictionary to a stream of activation batches, `evaluate` measures L0, FVU, dead latents and latent
densities; `interop` reads SAELens and sparsify directories and writes SAELens' layout."""

from .activations import ActivationBuffer, for_dictionary, training_tokens
from .dictionary import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError
from .interop import export_saelens, load_any, load_saelens, load_sparsify, load_sparsify_run
from .metrics import LatentStats, evaluate, fvu, l0
from .training import TrainResult, train

__all__ = ["ARCHITECTURES", "ActivationBuffer", "Dictionary", "DictionaryConfig", "DictionaryError", "LatentStats",
           "TrainResult", "evaluate", "export_saelens", "for_dictionary", "fvu", "l0", "load_any", "load_saelens",
           "load_sparsify", "load_sparsify_run", "train", "training_tokens"]
