"""Benchmarks (measurements, not tests): `synfleet bench dataplane | flood | http`."""
