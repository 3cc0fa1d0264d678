"""synfleet: a fleet of stateless eBPF SYN proxies, run by a Kubernetes operator."""

__version__ = "0.1.0"
