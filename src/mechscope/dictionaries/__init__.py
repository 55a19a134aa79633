"""Sparse dictionaries over a model's activations (method.md §11): SAEs of several architectures,
transcoders and crosscoders; one `Dictionary` object per trained dictionary, saved as safetensors
plus a JSON config."""

from .dictionary import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError

__all__ = ["ARCHITECTURES", "Dictionary", "DictionaryConfig", "DictionaryError"]
