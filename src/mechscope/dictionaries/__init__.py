"""Sparse dictionaries over a model's activations (method.md §11): SAEs of several architectures,
transcoders and crosscoders; one `Dictionary` object per trained dictionary, saved as safetensors
plus a JSON config."""

from .activations import ActivationBuffer, for_dictionary, training_tokens
from .dictionary import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError
from .interop import export_saelens, load_any, load_saelens, load_sparsify, load_sparsify_run

__all__ = ["ARCHITECTURES", "ActivationBuffer", "Dictionary", "DictionaryConfig", "DictionaryError",
           "export_saelens", "for_dictionary", "load_any", "load_saelens", "load_sparsify", "load_sparsify_run",
           "training_tokens"]
