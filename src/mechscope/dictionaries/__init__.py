"""Sparse dictionaries (SAEs, transcoders, crosscoders): activations, training, metrics, interop."""
