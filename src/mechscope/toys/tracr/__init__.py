"""Compiled transformers with known circuits (tracr) and a benchmark of mechscope's circuit finders
on them (docs/method.md §10). Needs the `tracr` extra (tracr-pypi, jax, dm-haiku)."""

from .compile import BOS, PAD, CompiledProgram, CompiledTokenizer, ProgramSpec, TracrError, compile_program
from .ground_truth import GroundTruth, ground_truth, varying_directions
from .model import CompiledConfig, CompiledTransformer
from .programs import SUITE, load_program
from .tasks import make_tracr_task

__all__ = ["BOS", "PAD", "SUITE", "CompiledConfig", "CompiledProgram", "CompiledTokenizer", "CompiledTransformer",
           "GroundTruth", "ProgramSpec", "TracrError", "compile_program", "ground_truth", "load_program",
           "make_tracr_task", "varying_directions"]
