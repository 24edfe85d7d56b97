"""Structured channel pruning with torch-pruning: see :mod:`u2zoo.pruning.prune`."""
