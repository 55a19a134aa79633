"""Patching: activation patching sweeps, path patching and direct logit attribution (docs/method.md §9)."""
