"""Probes: where a concept is linearly readable (linear and sparse probes, control tasks, CCS).

    concepts    built-in contrast sets (sentiment, number, truth) for any tokenizer, user JSONL, behaviours
    activations `collect`: every hook point's activations in one forward pass per batch
    linear      logistic-regression probes (L2, L1, top-k neurons) and the control task
    ccs         Contrast-Consistent Search
    study       per-layer probing in one call, probe save/load with the model's fingerprint, directions
"""

from .ccs import CCSResult, fit_ccs
from .concepts import Behaviour, ConceptError, ConceptSet, load_concept, make_concept
from .linear import Probe, ProbeError, control_labels, fit_probe
from .study import ProbeStudy, check_direction, load_probes, probe_direction, probe_layers, save_probes

__all__ = ["Behaviour", "CCSResult", "ConceptError", "ConceptSet", "Probe", "ProbeError", "ProbeStudy",
           "check_direction", "control_labels", "fit_ccs", "fit_probe", "load_concept", "load_probes", "make_concept",
           "probe_direction", "probe_layers", "save_probes"]
