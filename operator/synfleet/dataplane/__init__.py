"""The data plane as Python sees it: loaded programs, a DataplaneConfig written
into their maps, Maglev tables."""
