"""Analyzers: what the learned features mean musically."""
