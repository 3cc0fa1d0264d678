"""Shared fixtures. BPF tests need root and a BPF-capable kernel: where those
are missing they skip with the reason printed, except under
SYNFLEET_REQUIRE_BPF=1 (set by .ci/run), where a missing capability fails."""

from __future__ import annotations

import ipaddress
import os
import shutil
import time

import pytest

from synfleet import contract
from synfleet.config import schema
from synfleet.cookie import MasterKey, current_epoch, fresh_key, salts_for
from synfleet.dataplane.programs import BackendDataplane, ProxyDataplane
from synfleet_lab.testbed.lab import proxy_node_namespace
from synfleet_lab.testbed.netns import namespaces

ROTATION_S = 3600
ENCAP_PORT = 6080
PROXY_V4, PROXY_V6 = "198.18.0.1", "2001:db8:18::1"
BACKEND_V4, BACKEND_V6 = "198.18.0.2", "2001:db8:18::2"
SERVICE_V4, SERVICE_V6 = "198.19.0.10", "2001:db8:19::10"
CLIENT_V4, CLIENT_V6 = "198.18.1.7", "2001:db8:1::7"
# Another backend node of the pool: where a flow that moved was before (daisy chaining).
PEER_V4, PEER_V6 = "198.18.0.3", "2001:db8:18::3"
PORT_FULL, PORT_PLAIN, PORT_MONITOR = 80, 81, 82


def _policy(pid: int, port: int, mode: str = "enforce", **cookie) -> schema.PolicyEntry:
    return schema.PolicyEntry(id=pid, mode=mode, cookie=schema.Cookie(**cookie),
                         services=[{"address": a, "port": port} for a in (SERVICE_V4, SERVICE_V6)])


POLICY_FULL = _policy(1, PORT_FULL)
POLICY_PLAIN = _policy(2, PORT_PLAIN, windowScale=9, timestamps=False, ecn=False, sack=False)
POLICY_MONITOR = _policy(3, PORT_MONITOR, mode="monitor")


def _capability_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


def skip_unless_required(required_by: str, what: str, reason: str) -> None:
    """Skip with the reason printed, or fail where `required_by`=1 (CI) says
    these tests must run."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{required_by}=1 but this machine {reason}")
    print(f"skipping {what} test: this machine {reason}")
    pytest.skip(reason)


def network_namespaces() -> set[str]:
    """The named network namespaces that exist now."""
    return namespaces()


def require_bpf() -> None:
    reason = _capability_missing()
    if reason is not None:
        skip_unless_required("SYNFLEET_REQUIRE_BPF", "BPF", reason)


def require_tool(name: str) -> None:
    """A program the real-client tests drive (nginx, wrk): scripts/setup.sh installs them."""
    if shutil.which(name) is None:
        skip_unless_required("SYNFLEET_REQUIRE_BPF", name, f"has no {name} (scripts/setup.sh installs it)")


def _mid_epoch_clock_offset(rotation_s: int) -> float:
    """The unit tests' nodes run with this clock offset so that their clock
    starts in the middle of an epoch: no epoch boundary (half an hour away)
    falls inside a test session, and the session's salts stay current."""
    into_epoch_s = time.clock_gettime_ns(time.CLOCK_TAI) % (rotation_s * 10**9) / 1e9
    return rotation_s / 2 - into_epoch_s


UNIT_CLOCK_OFFSET_S = _mid_epoch_clock_offset(ROTATION_S)


def require_kube() -> None:
    """The operator tests build a real kube-apiserver with Go (or reuse a cached
    build) and need openssl; CI sets SYNFLEET_REQUIRE_KUBE=1 so they never skip there.
    The control plane is built here, once per machine, and not inside a test's
    timed subprocess: on a fresh 2-vCPU machine the build alone takes ~10 min."""
    from synfleet_lab.cluster.binaries import cached, kube_binaries, kube_tools

    missing = [tool for tool in ("openssl",) if shutil.which(tool) is None]
    if shutil.which("go") is None and cached() is None:
        missing.append("go (to build kube-apiserver)")
    if missing:
        skip_unless_required("SYNFLEET_REQUIRE_KUBE", "Kubernetes", f"needs {', '.join(missing)}")
    kube_binaries()
    kube_tools()


def require_image_builder() -> None:
    """Building the images takes root, buildah and debootstrap (scripts/setup.sh
    installs them); CI requires them with the Kubernetes tests."""
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        skip_unless_required("SYNFLEET_REQUIRE_KUBE", "images", f"needs {', '.join(missing)}")


def tai_epoch() -> int:
    """The salt epoch of the unit tests' nodes (see UNIT_CLOCK_OFFSET_S)."""
    return current_epoch(ROTATION_S, UNIT_CLOCK_OFFSET_S)


class Salts(dict):
    """epoch -> 16-byte salt, as the proxy's salt map holds them."""


def master_keys(from_epoch: int = 0) -> list[MasterKey]:
    """A pool's master key: one fresh generation, in force from `from_epoch`."""
    return [fresh_key(1, from_epoch)]


# The unit tests' pool master key, and the salts it gives around the unit nodes' epoch.
UNIT_KEYS = master_keys()


@pytest.fixture(scope="session")
def lab_images():
    """The images, built once per session (and cached across sessions by their
    inputs): the image tests and the lab cluster share them."""
    require_image_builder()
    from synfleet_lab.cluster.cluster import build_images

    return build_images()


@pytest.fixture(scope="session")
def unit_netns():
    """Tests run inside a namespace laid out like a proxy node, so that the
    proxy's bpf_fib_lookup() resolves during BPF_PROG_TEST_RUN."""
    require_bpf()
    with proxy_node_namespace(PROXY_V4, PROXY_V6) as ns:
        yield ns


@pytest.fixture(scope="session")
def salts() -> Salts:
    e = tai_epoch()
    return Salts(salts_for(UNIT_KEYS, range(e - 1, e + 2)))


UNIT_BACKEND_SET = "unit"    # every policy's backends, on the unit proxy


def unit_config(role: str, keys: list[MasterKey] | None = None) -> schema.DataplaneConfig:
    """Both programs in one namespace laid out like a proxy node: every policy,
    both service addresses, backends of both families."""
    proxy = role == "proxy"
    policies = [p.model_copy(update={"backend_set": UNIT_BACKEND_SET}) if proxy else p
                for p in (POLICY_FULL, POLICY_PLAIN, POLICY_MONITOR)]
    return schema.DataplaneConfig.model_validate({
        "apiVersion": schema.API_VERSION, "kind": schema.KIND, "role": role,
        "rotationSeconds": ROTATION_S,
        "node": {"interfaces": ["sf0"], "encapPort": ENCAP_PORT,
                 "clockOffsetSeconds": UNIT_CLOCK_OFFSET_S,
                 "addresses": {"ipv4": PROXY_V4 if proxy else BACKEND_V4,
                               "ipv6": PROXY_V6 if proxy else BACKEND_V6}},
        "policies": [p.model_dump(by_alias=True, mode="json", exclude_none=True) for p in policies],
        "backendSets": [{"name": UNIT_BACKEND_SET, "backends": [BACKEND_V4, BACKEND_V6]}] if proxy else [],
        "allowedProxies": [] if proxy else [PROXY_V4, PROXY_V6],
        "peerBackends": [] if proxy else [BACKEND_V4, BACKEND_V6, PEER_V4, PEER_V6],
        "saltKeys": contract.salt_key_entries(keys or []),
    })


@pytest.fixture(scope="session")
def proxy(unit_netns, salts) -> ProxyDataplane:
    dp = ProxyDataplane()
    dp.apply(unit_config("proxy", UNIT_KEYS))
    dp.set_salts(salts)
    yield dp
    dp.close()


@pytest.fixture(scope="session")
def backend(unit_netns) -> BackendDataplane:
    dp = BackendDataplane()
    dp.apply(unit_config("backend"))
    yield dp
    dp.close()


def addr_pair(family: int) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]:
    if family == 4:
        return ipaddress.ip_address(CLIENT_V4), ipaddress.ip_address(SERVICE_V4)
    return ipaddress.ip_address(CLIENT_V6), ipaddress.ip_address(SERVICE_V6)

def agent_document(document: dict, ipv4: str | None, ipv6: str | None,
                   keys: list[MasterKey] | None = None) -> schema.DataplaneConfig:
    """What a node's agent with these addresses builds from the ConfigMap's document."""
    addresses = {k: v for k, v in (("ipv4", ipv4), ("ipv6", ipv6)) if v}
    return schema.parse(contract.node_document(document, addresses, keys))


def backend_set_of(document: dict, policy_name: str) -> dict:
    """The backendSets entry a proxy document's policy (by name) sends to ({} if the policy is not there)."""
    entry = next((p for p in document["policies"] if p["name"] == policy_name), None)
    if entry is None:
        return {}
    return next(s for s in document["backendSets"] if s["name"] == entry["backendSet"])
