"""Attacks. Each reads only an Observation (gradient attacks) or black/white-box access (embedding attacks)."""
