"""Embedding inversion attacks."""
