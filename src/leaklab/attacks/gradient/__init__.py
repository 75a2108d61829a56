"""Gradient inversion attacks; each module registers itself with leaklab.attacks.base."""
