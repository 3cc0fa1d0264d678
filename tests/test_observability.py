"""What the chart ships for monitoring, against what real agents export: a real
Prometheus scrapes the fleet lab's agents (on their nodes' addresses, labelled
by pool and node as the chart's PodMonitor labels them), evaluates the
PrometheusRule exactly as `helm template` renders it, and answers the Grafana
dashboard's queries. Each alert is made to fire by its failure, on the node
that fails. The operator's own series are checked in test_operator.py."""

from __future__ import annotations

import time

import pytest
import yaml

from conftest import require_bpf, require_tool
from prometheus import Prometheus, dashboard_queries, rendered_rules
from synfleet import contract
from synfleet.cookie import current_epoch, fresh_key
from synfleet_lab.testbed.configs import SERVICE_PORT
from synfleet_lab.testbed.fleetlab import SERVICE, FleetLab

pytestmark = pytest.mark.netns

POOLS = {"proxy-a": "edge", "proxy-b": "edge", "backend-a": "web", "backend-b": "web"}


@pytest.fixture(scope="module")
def monitored():
    require_bpf()
    for tool in ("prometheus", "promtool"):
        require_tool(tool)
    with FleetLab(metrics_on_node=True) as lab:
        lab.start()
        targets = {lab.agents[name].listen: {"pool": pool, "node": name} for name, pool in POOLS.items()}
        with Prometheus(targets, rendered_rules(), ns=lab.nodes["client"].ns) as prom:
            yield lab, prom


def connect_through_the_proxy(lab: FleetLab) -> None:
    with lab.client_socket() as sock:
        sock.settimeout(5)
        sock.connect((SERVICE[4], SERVICE_PORT))
        assert sock.recv(64)


def write_changed(lab: FleetLab, name: str, change) -> str:
    """Write `name`'s configuration with `change` applied to its document; returns the original."""
    original = (lab.proxy_config(name) if name in ("proxy-a", "proxy-b") else lab.backend_config(name)).to_yaml()
    doc = yaml.safe_load(original)
    change(doc)
    lab.write_config(name, yaml.safe_dump(doc))
    return original


def test_a_healthy_fleet_answers_every_dashboard_query_and_fires_no_alert(monitored):
    lab, prom = monitored
    for _ in range(5):
        connect_through_the_proxy(lab)
    time.sleep(5)       # a few scrapes, so that rates have two samples
    empty = [(title, expr) for title, expr in dashboard_queries()
             if "synfleet_operator_" not in expr and not prom.query(expr)]
    assert not empty, f"panels whose queries return no series from real agents: {empty}"
    # The traffic shows where it should, labelled as the PodMonitor labels it.
    def by_pool(event: str) -> dict[str, float]:
        found = prom.query(f'sum by (pool) (synfleet_dataplane_packets_total{{event="{event}"}})')
        return {r["metric"]["pool"]: float(r["value"][1]) for r in found}

    answered, created = by_pool("syn_answered"), by_pool("reqsk_created")
    assert answered["edge"] >= 5 and answered["web"] == 0, answered
    assert created["web"] >= 5 and created["edge"] == 0, created
    assert prom.firing() == {}


def test_bypass_while_enforcing_fires_for_the_backend_reached_directly(monitored):
    lab, prom = monitored
    lab.flood("syn", rate=200, duration=4.0, target="backend-a").wait()
    alert = prom.wait_firing("SynfleetBypassWhileEnforcing", node="backend-a")
    assert alert["pool"] == "web" and alert["severity"] == "warning"
    assert "backend-b" not in {a["node"] for a in prom.firing()["SynfleetBypassWhileEnforcing"]}


def test_a_hook_that_cannot_be_attached_fires_hook_detached_and_not_ready(monitored):
    lab, prom = monitored
    original = write_changed(lab, "proxy-b", lambda doc: doc["node"]["interfaces"].append("sf-absent"))
    try:
        alert = prom.wait_firing("SynfleetHookDetached", node="proxy-b", interface="sf-absent")
        assert (alert["pool"], alert["severity"]) == ("edge", "critical")
        prom.wait_firing("SynfleetAgentNotReady", node="proxy-b")
        # The interface that has its program is not reported.
        assert not [a for a in prom.firing()["SynfleetHookDetached"] if a["interface"] == "eth0"]
    finally:
        lab.write_config("proxy-b", original)


def test_a_rejected_configuration_fires_config_rejected(monitored):
    lab, prom = monitored
    original = write_changed(lab, "backend-b", lambda doc: doc["node"].update(encapPort=99999))
    try:
        alert = prom.wait_firing("SynfleetConfigRejected", node="backend-b")
        assert alert["pool"] == "web"
    finally:
        lab.write_config("backend-b", original)


def test_salts_running_out_fire_salt_horizon_short(monitored):
    """A proxy whose master keys cover no epoch of its window (the next
    generation announced for much later, the one in force gone) holds no
    salt ahead."""
    lab, prom = monitored
    later = fresh_key(generation=9, from_epoch=current_epoch(lab.rotation_s) + 100_000)
    lab.salts.pause()
    try:
        write_changed(lab, "proxy-a", lambda doc: doc.update(saltKeys=contract.salt_key_entries([later])))
        alert = prom.wait_firing("SynfleetSaltHorizonShort", node="proxy-a")
        assert alert["pool"] == "edge"
        assert prom.query('synfleet_salt_horizon_seconds{node="proxy-a"}')[0]["value"][1] == "0"
        prom.wait_firing("SynfleetAgentNotReady", node="proxy-a")
    finally:
        lab.salts.resume()
        lab.write_proxy_configs()
