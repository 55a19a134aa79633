"""The export methods `Circuit` and `SpanCircuit` share (the work is in circuits/exports.py)."""

from __future__ import annotations


class Exportable:
    """`to_frame`, `to_networkx` and `to_dot` for a circuit, scored by `scores` (EdgeScores) or else by
    the circuit's own scores."""

    def to_frame(self, scores=None):
        """The circuit's edges as a pandas DataFrame, one row per edge (`exports.edge_frame`)."""
        from .exports import circuit_frame

        return circuit_frame(self, scores)

    def to_networkx(self, scores=None):
        """The circuit as a networkx.DiGraph with node and edge attributes (`exports.to_networkx`)."""
        from .exports import to_networkx

        return to_networkx(self, scores)

    def to_dot(self, scores=None) -> str:
        """The circuit as graphviz DOT text (`exports.to_dot`)."""
        from .exports import to_dot

        return to_dot(self, scores)
