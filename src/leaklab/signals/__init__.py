"""Red-team signals over vector dumps: repeated embeddings, document fingerprints, same-source tests."""

from leaklab.signals.cross import cross_source
from leaklab.signals.fingerprint import fingerprint
from leaklab.signals.repeated import repeated_embeddings
from leaklab.signals.vectors import VectorSet, load_vectors, save_vectors

__all__ = ["VectorSet", "cross_source", "fingerprint", "load_vectors", "repeated_embeddings", "save_vectors"]
