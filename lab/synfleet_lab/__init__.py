"""synfleet's lab: network-namespace testbeds, `synfleet demo`, `synfleet check`
and the benchmarks, with their own BPF programs (flood generators, sinks,
reflectors). A separate distribution: the product's wheel and images carry
none of it."""
