"""Sparse dictionaries over a model's activations (method.md §11): SAEs of several architectures,
transcoders and crosscoders; one `Dictionary` object per trained dictionary, saved as safetensors
plus a JSON config; `train` fits one to a stream of activation batches, `evaluate` measures L0, FVU,
dead latents and latent densities."""

from .dictionary import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError
from .metrics import LatentStats, evaluate, fvu, l0
from .training import TrainResult, train

__all__ = ["ARCHITECTURES", "Dictionary", "DictionaryConfig", "DictionaryError", "LatentStats", "TrainResult",
           "evaluate", "fvu", "l0", "train"]
