"""Patching (docs/method.md §12): activation patching sweeps and their attribution-patching estimate,
path patching, direct logit attribution, and the component names they read."""

from .attribution_patching import attribution_sweep, spearman
from .dla import DLAResult, direct_logit_attribution
from .path import PathPatchingResult, path_patch, path_patch_sets, path_patch_sweep
from .result import PatchResult, PatchResultError
from .sweep import COMPONENTS, DIRECTIONS, POSITIONS, REFERENCES, PatchingError, naive_sweep, patch_sweep

__all__ = ["COMPONENTS", "DIRECTIONS", "DLAResult", "POSITIONS", "PathPatchingResult", "REFERENCES", "PatchResult",
           "PatchResultError", "PatchingError", "attribution_sweep", "direct_logit_attribution", "naive_sweep",
           "patch_sweep", "path_patch", "path_patch_sets", "path_patch_sweep", "spearman"]
