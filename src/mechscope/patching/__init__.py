"""Activation patching sweeps and their attribution-patching estimate (docs/method.md §9)."""

from .attribution_patching import attribution_sweep, spearman
from .result import PatchResult, PatchResultError
from .sweep import COMPONENTS, DIRECTIONS, POSITIONS, REFERENCES, PatchingError, naive_sweep, patch_sweep

__all__ = ["COMPONENTS", "DIRECTIONS", "POSITIONS", "REFERENCES", "PatchResult", "PatchResultError", "PatchingError",
           "attribution_sweep", "naive_sweep", "patch_sweep", "spearman"]
