"""Benchmarks (measurements, not tests)."""

# The flood generators `synfleet bench flood` offers (synfleet.bench.generators).
GENERATORS = ("xdp", "trafgen")
