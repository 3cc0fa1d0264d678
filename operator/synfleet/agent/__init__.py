"""The node agent: loads, pins and configures the data plane of one node."""
