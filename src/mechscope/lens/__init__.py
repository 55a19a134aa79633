"""Lenses: read a model's intermediate residual streams as next-token distributions.

>>> from mechscope import lens
>>> tokens = lens.sampled_text(model, length=128, count=32, seed=0)   # or lens.load_text("corpus.txt", ...)
>>> tuned, log = lens.train_tuned_lens(model, tokens, n_tokens=2048, out="smollm2.lens")
>>> held_out = lens.sampled_text(model, length=128, count=8, seed=1)
>>> table = lens.evaluate_lenses(model, held_out, tuned)   # mean KL(final || lens) per layer
>>> grid = lens.lens_predictions(model, "The capital of France is", tuned, k=5)
"""

from .evaluation import LensEvaluation, LensPredictions, evaluate_lenses, lens_predictions
from .logit_lens import LensError, decode, kl_to_final, residuals, streams
from .text import TextError, load_text, read_text, sampled_text, tokenize_text
from .tuned_lens import TrainingLog, TunedLens, train_tuned_lens

__all__ = [
    "LensError",
    "LensEvaluation",
    "LensPredictions",
    "TextError",
    "TrainingLog",
    "TunedLens",
    "decode",
    "evaluate_lenses",
    "kl_to_final",
    "lens_predictions",
    "load_text",
    "read_text",
    "residuals",
    "sampled_text",
    "streams",
    "tokenize_text",
    "train_tuned_lens",
]
