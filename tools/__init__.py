"""Standalone tools (model conversion, image resizing, ...)."""
