"""The YAML text of every document synfleet writes or reads (pool ConfigMaps,
salt Secrets, agent config files), through libyaml when PyYAML has it (its
wheels do): PyYAML's pure-Python dumper and loader take ~100 ms each for a
36 KB data-plane document, a quarter of that and less through libyaml, and an
operator writes several such documents per render, an agent reads one per
change. Both are YAML's safe subset either way."""

from __future__ import annotations

import yaml

YAMLError = yaml.YAMLError
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str | bytes) -> object:
    return yaml.load(text, Loader=_LOADER)


def dump(document: object) -> str:
    """Keys in the document's own order (apiVersion and kind first, as written)."""
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)
