"""Probes: where a concept is linearly readable (linear and sparse probes, control tasks, CCS)."""
