"""Attacks: gradient attacks read only an Observation; embedding attacks get black- or white-box access."""
