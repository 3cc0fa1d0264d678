"""Pure builders: Kubernetes objects from synfleet's custom resources. No I/O
here; the operator's handlers fetch, call these, and write the results."""
