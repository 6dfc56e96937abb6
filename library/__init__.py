"""Shared library of the SD training toolkit (models, datasets, training core)."""
