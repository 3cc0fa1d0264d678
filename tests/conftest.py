"""Shared fixtures. BPF tests need root and a BPF-capable kernel: where those
are missing they skip with the reason printed, except under
SYNFLEET_REQUIRE_BPF=1 (set by .ci/run), where a missing capability fails."""

from __future__ import annotations

import ipaddress
import os
import secrets
import time

import pytest

from synfleet.dataplane.programs import (
    BackendDataplane,
    PolicySpec,
    ProxyDataplane,
    node_config,
)
from synfleet.testbed.lab import proxy_node_namespace

ROTATION_S = 3600
ENCAP_PORT = 6080
PROXY_V4, PROXY_V6 = "198.18.0.1", "2001:db8:18::1"
BACKEND_V4, BACKEND_V6 = "198.18.0.2", "2001:db8:18::2"
SERVICE_V4, SERVICE_V6 = "198.19.0.10", "2001:db8:19::10"
CLIENT_V4, CLIENT_V6 = "198.18.1.7", "2001:db8:1::7"
PORT_FULL, PORT_PLAIN, PORT_MONITOR = 80, 81, 82
POLICY_FULL = PolicySpec(policy_id=1)
POLICY_PLAIN = PolicySpec(policy_id=2, wscale=9, timestamps=False, ecn=False, sack=False)
POLICY_MONITOR = PolicySpec(policy_id=3, enforce=False)


def _capability_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


def require_bpf() -> None:
    reason = _capability_missing()
    if reason is None:
        return
    if os.environ.get("SYNFLEET_REQUIRE_BPF") == "1":
        pytest.fail(f"SYNFLEET_REQUIRE_BPF=1 but this machine {reason}")
    print(f"skipping BPF test: this machine {reason}")
    pytest.skip(reason)


def tai_epoch(rotation_s: int = ROTATION_S) -> int:
    return time.clock_gettime_ns(time.CLOCK_TAI) // (rotation_s * 10**9)


class Salts(dict):
    """epoch -> 16-byte key, as published to the proxy."""


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
    return Salts({e - 1: secrets.token_bytes(16), e: secrets.token_bytes(16),
                  e + 1: secrets.token_bytes(16)})


def configure(dp, *, proxy: bool) -> None:
    dp.set_config(node_config(ROTATION_S, ENCAP_PORT, PROXY_V4 if proxy else BACKEND_V4,
                              PROXY_V6 if proxy else BACKEND_V6))
    for spec, port in ((POLICY_FULL, PORT_FULL), (POLICY_PLAIN, PORT_PLAIN),
                       (POLICY_MONITOR, PORT_MONITOR)):
        dp.set_policy(spec)
        for svc in (SERVICE_V4, SERVICE_V6):
            dp.add_service(svc, port, spec.policy_id)


@pytest.fixture(scope="session")
def proxy(unit_netns, salts) -> ProxyDataplane:
    dp = ProxyDataplane()
    configure(dp, proxy=True)
    dp.set_salts(salts)
    for spec in (POLICY_FULL, POLICY_PLAIN, POLICY_MONITOR):
        dp.set_backends(spec.policy_id, [BACKEND_V4, BACKEND_V6])
    yield dp
    dp.close()


@pytest.fixture(scope="session")
def backend(unit_netns) -> BackendDataplane:
    dp = BackendDataplane()
    configure(dp, proxy=False)
    dp.allow_proxy(PROXY_V4)
    dp.allow_proxy(PROXY_V6)
    yield dp
    dp.close()


def addr_pair(family: int) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]:
    if family == 4:
        return ipaddress.ip_address(CLIENT_V4), ipaddress.ip_address(SERVICE_V4)
    return ipaddress.ip_address(CLIENT_V6), ipaddress.ip_address(SERVICE_V6)
