"""`synfleet operator`: kopf handlers (handlers.py) over the pure builders in
synfleet.resources; reconcile.py does the reading and writing."""
