"""The DataplaneConfig schema: what it accepts, and that every rejection names
the field to fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from synfleet.config import schema, yamltext
from synfleet.cookie import MasterKey

PROXY = {
    "apiVersion": "synfleet.io/v1alpha1", "kind": "DataplaneConfig", "role": "proxy",
    "rotationSeconds": 60,
    "node": {"interfaces": ["eth0"], "addresses": {"ipv4": "198.18.0.1", "ipv6": "2001:db8:18::1"}},
    "policies": [{"id": 1, "services": [{"address": "198.19.0.10", "port": 443}], "backendSet": "web"}],
    "backendSets": [{"name": "web", "backends": ["198.18.0.11", "198.18.0.12"]}],
    "saltKeys": [{"generation": 1, "fromEpoch": 0, "key": "00" * 32},
                 {"generation": 2, "fromEpoch": 101, "key": "11" * 32}],
}
BACKEND = {**PROXY, "role": "backend", "saltKeys": [], "backendSets": [],
           "policies": [{"id": 1, "services": [{"address": "198.19.0.10", "port": 443}]}],
           "allowedProxies": ["198.18.0.1"]}


def edited(base: dict, path: str, value) -> dict:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


DELETE = object()


def test_minimal_documents_parse_with_defaults():
    proxy = schema.parse(PROXY)
    assert proxy.node.encap_port == 6080
    assert proxy.policies[0].mode is schema.Mode.ENFORCE
    assert proxy.policies[0].cookie.mss_v4 == schema.DEFAULT_MSS_V4
    assert proxy.master_keys[1] == MasterKey(2, 101, bytes([0x11] * 32))
    assert proxy.failure_policy is schema.FailurePolicy.OPEN
    assert schema.parse(BACKEND).allowed_proxies[0].version == 4


def test_a_document_survives_a_yaml_round_trip():
    cfg = schema.parse(PROXY)
    assert schema.loads(cfg.to_yaml()) == cfg


def test_a_compact_document_is_yaml_that_any_yaml_reader_reads_alike():
    """The operator writes pool documents as JSON: an agent of any version reads them."""
    text = yamltext.dump_compact(PROXY | {"note": "naïve: {quoted} 'text'"})
    assert "\n" not in text
    assert yaml.safe_load(text) == yamltext.load(text) == yamltext.load(text.encode()) == \
        PROXY | {"note": "naïve: {quoted} 'text'"}
    assert schema.loads(yamltext.dump_compact(PROXY)) == schema.parse(PROXY)


def test_a_yaml_flow_mapping_that_is_not_json_is_read_as_yaml():
    assert yamltext.load("{role: proxy, rotationSeconds: 60}") == {"role": "proxy", "rotationSeconds": 60}


def test_the_module_docstring_example_is_a_valid_proxy_document():
    example = schema.__doc__.split("\n\n", 1)[1]
    doc = yaml.safe_load(example)
    assert schema.parse({**doc, "allowedProxies": [], "peerBackends": []}).role is schema.Role.PROXY


@pytest.mark.parametrize("base, path, value, message", [
    (PROXY, "apiVersion", "synfleet.io/v9", "apiVersion: 'synfleet.io/v9' is not supported"),
    (PROXY, "kind", "Config", "kind: Input should be 'DataplaneConfig'"),
    (PROXY, "role", "router", "role: Input should be 'proxy' or 'backend'"),
    (PROXY, "rotationSeconds", 0, "rotationSeconds: Input should be greater than or equal to 1"),
    (PROXY, "node.interfaces", [], "node.interfaces: List should have at least 1 item"),
    (PROXY, "node.interfaces", ["a/b"], "node.interfaces[0]: String should match pattern"),
    (PROXY, "node.addresses", {}, "node.addresses: give the node's ipv4 or ipv6 address"),
    (PROXY, "node.addresses.ipv4", "198.18.0.300", "node.addresses.ipv4: Input is not a valid IPv4"),
    (PROXY, "node.encapPort", 70000, "node.encapPort: Input should be less than or equal to 65535"),
    (PROXY, "node.colour", "blue", "node.colour: Extra inputs are not permitted"),
    (PROXY, "policies.0.id", 0, "policies[0].id: Input should be greater than or equal to 1"),
    (PROXY, "policies.0.id", 8192, "policies[0].id: Input should be less than 8192"),
    (PROXY, "policies.0.mode", "audit", "policies[0].mode: Input should be 'enforce' or 'monitor'"),
    (PROXY, "policies.0.services.0.port", 0, "policies[0].services[0].port: Input should be greater"),
    (PROXY, "policies.0.services.0.address", "10.0.0.0/8", "policies[0].services[0].address"),
    (PROXY, "policies.0.cookie", {"mssV4": [1460, 536, 1300, 1440]}, "mssV4 [1460, 536, 1300, 1440] must"),
    (PROXY, "policies.0.cookie", {"mssV6": [1000, 1420, 1440, 8940]}, "the kernel needs at least 1220"),
    (PROXY, "policies.0.cookie", {"windowScale": 15}, "policies[0].cookie.windowScale: Input should be less"),
    (PROXY, "policies.0.cookie", {"mtu": 1000}, "policies[0].cookie.mtu: Input should be greater"),
    (PROXY, "policies.0.backendSet", DELETE, "policies[0] (id 1): a proxy needs the policy's backendSet"),
    (PROXY, "policies.0.backendSet", "api", "policies[0] (id 1): backendSet 'api' is not in backendSets (web)"),
    (PROXY, "backendSets.0.backends", [], "backendSets[0].backends: List should have at least 1 item"),
    (PROXY, "backendSets.0.backends", ["198.18.0.11", "198.18.0.11"], "a backend address is listed twice"),
    (PROXY, "backendSets.0.drainSeconds", -1, "backendSets[0].drainSeconds: Input should be greater"),
    (PROXY, "backendSets", [{"name": "web", "backends": ["198.18.0.11"]}] * 2, "backendSets ['web'] are listed twice"),
    (PROXY, "saltKeys", [], "a proxy needs saltKeys"),
    (PROXY, "saltKeys.0.key", "00" * 16, "saltKeys[0].key: String should match pattern"),
    (PROXY, "saltKeys.0.generation", 2, "saltKeys generations [2, 2] must be distinct"),
    (PROXY, "saltKeys.0.fromEpoch", 101, "a later generation must start at a later epoch"),
    (PROXY, "failurePolicy", "sometimes", "failurePolicy: Input should be 'open' or 'closed'"),
    (PROXY, "allowedProxies", ["198.18.0.1"], "allowedProxies is for backends"),
    (BACKEND, "allowedProxies", [], "a backend needs allowedProxies"),
    (BACKEND, "saltKeys", PROXY["saltKeys"], "saltKeys are for proxies only"),
    (BACKEND, "policies.0.backendSet", "web", "backendSets and policies[].backendSet are for proxies"),
    (BACKEND, "backendSets", PROXY["backendSets"], "backendSets and policies[].backendSet are for proxies"),
    (BACKEND, "node.xdp", True, "node.xdp is for proxies"),
    (PROXY, "node.xdp", "sometimes", "node.xdp: Input should be a valid boolean"),
])
def test_invalid_documents_are_rejected_naming_the_field(base, path, value, message):
    with pytest.raises(schema.ConfigError) as err:
        schema.parse(edited(base, path, value))
    assert message in str(err.value)


def test_a_service_in_two_policies_is_rejected():
    doc = copy.deepcopy(PROXY)
    doc["policies"].append({**doc["policies"][0], "id": 2})
    with pytest.raises(schema.ConfigError, match="198.19.0.10 port 443 is in policies 1 and 2"):
        schema.parse(doc)


def test_duplicate_policy_ids_are_rejected():
    doc = copy.deepcopy(PROXY)
    doc["policies"].append({**doc["policies"][0], "services": [{"address": "198.19.0.11", "port": 1}]})
    with pytest.raises(schema.ConfigError, match=r"policy ids \[1\] are used twice"):
        schema.parse(doc)


def test_not_yaml_and_not_a_mapping_are_rejected():
    with pytest.raises(schema.ConfigError, match="not YAML"):
        schema.loads("a: [")
    with pytest.raises(schema.ConfigError, match="expected a mapping"):
        schema.loads("- 1")
