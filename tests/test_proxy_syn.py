"""Proxy SYN -> SYN+ACK through BPF_PROG_TEST_RUN, against the Python reference."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from conftest import POLICY_FULL, POLICY_PLAIN, PORT_FULL, PORT_PLAIN, addr_pair, tai_epoch
from packets import CLIENT_MAC, PROXY_MAC, TC_ACT_REDIRECT, checksums_valid, tcp_frame, tcp_options
from synfleet.abi import Counter
from synfleet.cookie import CookieAttributes, FourTuple, cookie_make, epoch_bits, mss_index, synack_tsval

POLICIES = {PORT_FULL: POLICY_FULL, PORT_PLAIN: POLICY_PLAIN}


@st.composite
def syns(draw):
    family = draw(st.sampled_from([4, 6]))
    port = draw(st.sampled_from(sorted(POLICIES)))
    opts = []
    if draw(st.booleans()):
        opts.append(("MSS", draw(st.integers(0, 65535))))
    if draw(st.booleans()):
        opts.append(("WScale", draw(st.integers(0, 255))))
    if draw(st.booleans()):
        opts.append(("SAckOK", b""))
    if draw(st.booleans()):
        opts.append(("Timestamp", (draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))))
    opts = draw(st.permutations(opts))
    nops = draw(st.integers(0, 40 - sum({"MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10}[k]
                                         for k, _ in opts)))
    at = draw(st.integers(0, len(opts)))
    opts = opts[:at] + [("NOP", None)] * nops + opts[at:]
    return dict(family=family, port=port, options=opts,
                sport=draw(st.integers(1, 65535)), isn=draw(st.integers(0, 2**32 - 1)),
                ecn_flags=draw(st.sampled_from(["", "E", "C", "EC"])),
                tos=draw(st.integers(0, 255)),
                payload=draw(st.sampled_from([b"", b"x", b"early data" * 3])))


def expected_attrs(case, policy) -> tuple[CookieAttributes, dict]:
    o = dict(case["options"])
    fam = case["family"]
    mss = o.get("MSS", 536 if fam == 4 else 1220)
    ws = min(o["WScale"], 14) if "WScale" in o else None
    sack = "SAckOK" in o and policy.cookie.sack
    ts = "Timestamp" in o and policy.cookie.timestamps
    ecn = case["ecn_flags"] == "EC" and policy.cookie.ecn
    attrs = CookieAttributes(mss_index(policy.cookie.mss_v4 if fam == 4 else policy.cookie.mss_v6, mss), ws, sack, ecn)
    want = {"MSS": policy.cookie.advertised_mss(fam)}
    if ws is not None:
        want["WScale"] = policy.cookie.window_scale
    if sack:
        want["SAckOK"] = b""
    return attrs, want | ({"Timestamp": o["Timestamp"][0]} if ts else {})


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=syns())
def test_syn_is_answered_with_a_cookie_synack_equal_to_the_reference(proxy, salts, case):
    client, service = addr_pair(case["family"])
    policy = POLICIES[case["port"]]
    ip_kw = {"tos": case["tos"]} if case["family"] == 4 else {"tc": case["tos"]}
    frame = tcp_frame(client, service, case["sport"], case["port"], flags="S" + case["ecn_flags"],
                      seq=case["isn"], options=case["options"], payload=case["payload"], **ip_kw)
    before = proxy.counter_values()[Counter.SYN_ANSWERED]

    run = proxy.program.test_run(frame)

    assert run.retval == TC_ACT_REDIRECT
    assert proxy.counter_values()[Counter.SYN_ANSWERED] == before + 1
    out = Ether(run.data)
    assert (out.src, out.dst) == (PROXY_MAC, CLIENT_MAC)
    l3 = out[IP] if case["family"] == 4 else out[IPv6]
    tcp = out[TCP]
    assert (l3.src, l3.dst) == (str(service), str(client))
    assert (tcp.sport, tcp.dport) == (case["port"], case["sport"])
    assert checksums_valid(run.data)
    assert len(tcp.payload) == 0
    attrs, want_opts = expected_attrs(case, policy)
    assert str(tcp.flags) == ("SAE" if attrs.ecn else "SA")
    assert tcp.ack == (case["isn"] + 1) % 2**32
    # The epoch is the current one (or the next, should the clock tick mid-test).
    epoch = tai_epoch()
    epoch = epoch if epoch_bits(tcp.seq) == epoch & 3 else epoch + 1
    t = FourTuple(client, service, case["sport"], case["port"])
    timestamps = "Timestamp" in want_opts
    assert tcp.seq == cookie_make(salts[epoch], epoch, t, case["isn"], attrs, timestamps)
    if timestamps:
        client_tsval = want_opts.pop("Timestamp")
        want_opts["Timestamp"] = (synack_tsval(salts[epoch], epoch, t, case["isn"], tcp.seq), client_tsval)
    assert tcp_options(run.data) == want_opts
