"""Models whose mechanism is known: compiled tracr programs (ground-truth circuits, `toys.tracr`) and
trained toy models (superposition, modular addition, induction heads, max-of-K with proofs), each with
a config holding its paper's defaults, seeded training with checkpoints, and the analysis that shows
its mechanism (`get_toy(name)`, `mechscope toy train|analyze NAME`)."""

from .registry import Toy, get_toy, toy_names
from .training import ToyError, TrainState, read_checkpoint, save_checkpoint, train_loop
from .transformer import HookedToyTransformer, ToyConfig

__all__ = ["HookedToyTransformer", "Toy", "ToyConfig", "ToyError", "TrainState", "get_toy", "read_checkpoint",
           "save_checkpoint", "toy_names", "train_loop"]
