"""Experiments: the one runner (:mod:`.runner`) every front-end goes through."""
