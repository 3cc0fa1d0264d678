"""The text of every document synfleet writes or reads (pool ConfigMaps, salt
Secrets, agent config files). All of it is YAML; the documents only machines
read (a pool's ConfigMap, what an agent hands its schema) are written as
JSON, YAML's JSON subset, which any YAML reader (an older agent's too) reads:
PyYAML takes ~30 ms to write a 36 KB data-plane document even through libyaml
(its representer is Python), JSON under 1 ms, and an operator writes several
per render under policy churn. YAML goes through libyaml when PyYAML has it
(its wheels do)."""

from __future__ import annotations

import json

import yaml

YAMLError = yaml.YAMLError
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str | bytes) -> object:
    """A YAML document; one written as JSON goes through the JSON parser."""
    if isinstance(text, bytes):
        text = text.decode()
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass        # a YAML flow mapping that is not JSON
    return yaml.load(text, Loader=_LOADER)


def dump(document: object) -> str:
    """For people to read: block YAML, keys in the document's own order."""
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)


def dump_compact(document: object) -> str:
    """For machines to read: one line of JSON, keys in the document's own order."""
    return json.dumps(document, separators=(",", ":"))
