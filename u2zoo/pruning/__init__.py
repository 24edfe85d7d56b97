"""Structured channel pruning with torch-pruning.

Not implemented yet: tracked by the training/pruning issue.
"""
