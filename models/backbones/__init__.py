"""Backbone adapters: one file per model family (how to load it, condition it, call it, export it)."""
