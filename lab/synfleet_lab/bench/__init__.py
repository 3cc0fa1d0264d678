"""Benchmarks (measurements, not tests)."""

# The flood generators `synfleet bench flood` offers (synfleet_lab.bench.generators).
GENERATORS = ("xdp", "trafgen")
