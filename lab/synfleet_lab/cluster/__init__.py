"""A real Kubernetes cluster on one machine for synfleet's end-to-end tests,
and what it needs: the project's images built without a registry."""
