"""Schemas of named spans without writing them by hand: token saliency, schema induction, and an
optional LLM backend (docs/method.md §9)."""
