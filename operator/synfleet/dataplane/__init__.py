"""The data plane as Python sees it: map layouts, tables, and loaded programs."""
