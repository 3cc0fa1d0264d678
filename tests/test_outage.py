"""The data plane outlives its control plane: proxies derive every epoch's salt
from the pool's master key and keep hours of epochs loaded, so clients keep
connecting while the control plane or the agents are gone; the next key
generation takes over with no failed handshake; and a proxy with no usable
salt fails open (to the backends' own SYN cookies) or closed, as its pool says.

BPF programs through BPF_PROG_TEST_RUN first, then the fleet lab: real agent
processes and real TCP clients, one-second epochs."""

from __future__ import annotations

import signal
import time

import pytest
from scapy.layers.inet import UDP
from scapy.layers.l2 import Ether

from conftest import BACKEND_V4, PORT_FULL, PROXY_V4, UNIT_KEYS, addr_pair, require_bpf, tai_epoch, unit_config
from fleet import wait_for
from packets import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, decode_encap, delta, encapsulated, tcp_frame
from synfleet.abi import ENCAP_F_UNGUARDED, ENCAP_F_VALIDATED, Counter
from synfleet.agent.agent import salt_window
from synfleet.config.schema import FailurePolicy
from synfleet.cookie import CookieAttributes, FourTuple, cookie_make, derive_salt, fresh_key, salts_for
from synfleet_lab.testbed.clients import ClientLoad, attempt
from synfleet_lab.testbed.fleetlab import BACKENDS, PROXIES, FleetLab

ATTRS = CookieAttributes(mss_index=3, wscale=7, sack=True, ecn=False)
LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def syn(family: int = 4, sport: int = 41000) -> bytes:
    client, service = addr_pair(family)
    return tcp_frame(client, service, sport, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)


def handshake_ack(family: int, sport: int, isn: int, cookie: int) -> bytes:
    client, service = addr_pair(family)
    return tcp_frame(client, service, sport, PORT_FULL, flags="A", seq=isn + 1, ack=(cookie + 1) % 2**32)


@pytest.fixture
def saltless_proxy(proxy, salts):
    """The unit proxy with its salt map emptied (an agent and control plane
    gone for longer than the salts it loaded ahead), put back afterwards."""
    proxy.set_salts({})
    yield proxy
    proxy.apply(unit_config("proxy", UNIT_KEYS))
    proxy.set_salts(salts)


# ---- the data plane, through BPF_PROG_TEST_RUN ----

@pytest.mark.parametrize("family", [4, 6])
def test_outage_a_fail_open_proxy_without_a_salt_sends_syns_and_acks_to_a_backend_unguarded(
        saltless_proxy, family):
    run, counted = delta(saltless_proxy, syn(family))
    assert run.retval == TC_ACT_REDIRECT
    e = decode_encap(run.data)
    assert e["flags"] == ENCAP_F_UNGUARDED and e["udp"].dport == 6080
    assert counted == {Counter.SALT_MISSING: 1, Counter.FAIL_OPEN: 1, Counter.FORWARDED: 1}
    # The handshake's ACK carries no cookie of ours: it goes unguarded too.
    run, counted = delta(saltless_proxy, handshake_ack(family, 41000, 5, 12345))
    assert run.retval == TC_ACT_REDIRECT and decode_encap(run.data)["flags"] == ENCAP_F_UNGUARDED
    assert counted[Counter.FAIL_OPEN] == 1


def test_outage_a_fail_closed_proxy_without_a_salt_drops_syns(saltless_proxy):
    cfg = unit_config("proxy", UNIT_KEYS)
    saltless_proxy.apply(cfg.model_copy(update={"failure_policy": FailurePolicy.CLOSED}))
    run, counted = delta(saltless_proxy, syn())
    assert run.retval == TC_ACT_SHOT
    assert counted == {Counter.SALT_MISSING: 1}
    run, counted = delta(saltless_proxy, handshake_ack(4, 41000, 5, 12345))
    assert run.retval == TC_ACT_REDIRECT and decode_encap(run.data)["flags"] == 0
    assert Counter.FAIL_OPEN not in counted


def test_outage_with_salts_a_fail_open_proxy_answers_and_guards_as_ever(proxy):
    run, counted = delta(proxy, syn())
    assert run.retval == TC_ACT_REDIRECT and counted == {Counter.SYN_ANSWERED: 1}
    assert UDP not in Ether(run.data)           # a SYN+ACK back to the client, not encapsulated
    run, counted = delta(proxy, handshake_ack(4, 41000, 5, 12345))     # a forged ACK
    assert decode_encap(run.data)["flags"] == 0 and Counter.FAIL_OPEN not in counted


@pytest.mark.parametrize("flags", ["S", "A"])
def test_outage_an_unguarded_segment_from_an_allowed_proxy_goes_to_the_kernel(backend, flags):
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags=flags, seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, PROXY_V4, BACKEND_V4, 1, ENCAP_F_UNGUARDED))
    assert run.retval == TC_ACT_OK and run.data[14:] == inner[14:]
    assert counted == {Counter.DECAPSULATED: 1, Counter.FAIL_OPEN: 1}


def test_outage_an_unguarded_segment_from_an_unknown_source_is_dropped(backend):
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="S", seq=5)
    run, counted = delta(backend, encapsulated(inner, "198.18.9.9", BACKEND_V4, 1, ENCAP_F_UNGUARDED))
    assert run.retval == TC_ACT_SHOT and counted == {Counter.UNKNOWN_SOURCE: 1}


def test_outage_across_a_generation_switch_cookies_of_the_epoch_before_still_validate(proxy, salts):
    """Generation 2 takes over at the current epoch: the previous epoch's
    cookies were minted under generation 1 and validate; this epoch's under 2."""
    now = tai_epoch()
    keys = [UNIT_KEYS[0], fresh_key(2, now)]
    proxy.set_salts(salts_for(keys, salt_window(3600, now)))
    try:
        client, service = addr_pair(4)
        t = FourTuple(client, service, 42000, PORT_FULL)
        old = cookie_make(derive_salt(keys[0].key, 1, now - 1), now - 1, t, 9, ATTRS)
        new = cookie_make(derive_salt(keys[1].key, 2, now), now, t, 9, ATTRS)
        stale_generation = cookie_make(derive_salt(keys[0].key, 1, now), now, t, 9, ATTRS)
        for cookie, flags in ((old, ENCAP_F_VALIDATED), (new, ENCAP_F_VALIDATED), (stale_generation, 0)):
            run = proxy.program.test_run(handshake_ack(4, 42000, 9, cookie))
            assert decode_encap(run.data)["flags"] == flags
    finally:
        proxy.set_salts(salts)


# ---- the fleet lab: real agents, real clients ----

@pytest.fixture(scope="module")
def lab():
    """One-second epochs; a master key generation every 6 s, announced 3 s ahead."""
    require_bpf()
    with FleetLab(rotation_s=1, master_rotation_s=6) as lab:
        yield lab.start()


def through_both_proxies(lab: FleetLab, seconds: float) -> list:
    """Clients connecting for `seconds`, through proxy-a, then proxy-b."""
    load = ClientLoad(lab, concurrency=2).start()
    try:
        time.sleep(seconds / 2)
        lab.route_via("proxy-b")
        time.sleep(seconds / 2)
    finally:
        attempts = load.stop()
        lab.route_via("proxy-a")
    return attempts


def failed(attempts) -> list:
    return [a for a in attempts if not a.ok]


def test_outage_handshakes_succeed_across_master_key_generations(lab):
    first = lab.salts.keys[-1].generation
    attempts = through_both_proxies(lab, 14)
    assert lab.salts.keys[-1].generation >= first + 2, "two generations took over during the load"
    assert len(attempts) > 100 and not failed(attempts), failed(attempts)[:3]


def test_outage_clients_keep_connecting_with_the_control_plane_gone_for_ten_epochs(lab):
    lab.salts.pause()
    try:
        before = lab.counters(PROXIES)
        attempts = through_both_proxies(lab, 12)
    finally:
        lab.salts.resume()
    after = lab.counters(PROXIES)
    assert len(attempts) > 100 and not failed(attempts), failed(attempts)[:3]
    assert after["salt_missing"] == before["salt_missing"]
    assert after["syn_answered"] - before["syn_answered"] >= len(attempts)


def test_outage_clients_keep_connecting_with_both_proxy_agents_dead_for_ten_epochs(lab):
    for name in PROXIES:
        lab.agents[name].signal(signal.SIGKILL)
    try:
        attempts = through_both_proxies(lab, 12)
    finally:
        for name in PROXIES:
            lab.agents[name].start()
        for name in PROXIES:
            lab.agents[name].wait_ready()
    assert len(attempts) > 100 and not failed(attempts), failed(attempts)[:3]


@pytest.fixture
def saltless_lab(lab):
    """The proxies' master key starts a thousand epochs from now: no usable salt."""
    lab.salts.pause()
    published = lab.salts.keys
    lab.salts.keys = [fresh_key(published[-1].generation + 1, lab.salts.epoch() + 1000)]
    yield lab
    lab.failure_policy = "open"
    lab.salts.keys = published
    lab.write_proxy_configs()
    lab.salts.resume()
    for name in PROXIES:
        wait_for(lambda n=name: lab.agents[n].http("/readyz")[0] == 200, f"{name} ready again")


def configured(lab: FleetLab, reason: str) -> None:
    """Write the proxies' files and wait until both agents report `reason` as
    why they are not ready (what they applied, not an earlier file)."""
    lab.write_proxy_configs()
    for name in PROXIES:
        wait_for(lambda n=name: reason in lab.agents[n].http("/readyz")[1], f"{name}: {reason}")


def test_outage_failure_policy_open_hands_syns_to_the_backends_own_cookies(saltless_lab):
    lab = saltless_lab
    configured(lab, "SYNs go to the backends unguarded (failurePolicy open)")
    proxies, backends = lab.counters(PROXIES), lab.counters(BACKENDS)
    attempts = through_both_proxies(lab, 4)
    assert len(attempts) > 20 and not failed(attempts), failed(attempts)[:3]
    proxies_after, backends_after = lab.counters(PROXIES), lab.counters(BACKENDS)
    assert proxies_after["syn_answered"] == proxies["syn_answered"]
    assert proxies_after["fail_open"] - proxies["fail_open"] >= 2 * len(attempts)     # each SYN and ACK
    assert backends_after["fail_open"] - backends["fail_open"] >= 2 * len(attempts)


def test_outage_failure_policy_closed_drops_syns_and_says_so(saltless_lab):
    lab = saltless_lab
    lab.failure_policy = "closed"
    configured(lab, "SYNs are dropped (failurePolicy closed)")
    before = lab.counters(PROXIES)
    results = [attempt(lab, 4, timeout=0.5) for _ in range(3)]
    assert not any(a.ok for a in results)
    assert lab.counters(PROXIES)["salt_missing"] - before["salt_missing"] >= 3
