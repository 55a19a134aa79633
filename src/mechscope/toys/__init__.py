"""Models whose mechanism is known: compiled tracr programs (ground-truth circuits)."""
