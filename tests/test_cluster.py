"""synfleet in a real Kubernetes cluster, installed as users install it: four
nodes in network namespaces, each with a real kubelet, containerd (runc, CNI)
and kube-proxy (synfleet_lab.cluster), the images built from the Dockerfile,
then only `helm install` and `kubectl`.

What the runtime applies is read from the kernel, not from the pod spec: the
agents' capabilities, seccomp mode and read-only root from /proc, their
programs from each node's own interfaces and bpffs."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import backend_set_of, require_bpf, require_kube
from synfleet.bpf.links import tcx_programs
from synfleet_lab.cluster.cgroups import CgroupTree, hierarchies
from synfleet_lab.cluster.cluster import (
    BACKEND_NODES,
    FLOOD_PREFIX,
    NODES,
    PROXY_NODES,
    SERVICE_ADDRESS,
    LabCluster,
    wait_until,
)
from synfleet_lab.testbed.netns import namespaces

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "lab" / "synfleet_lab" / "cluster" / "manifests"
NAMESPACE = "synfleet-system"
# Capability bits (linux/capability.h): what the chart grants the agent, and nothing else.
CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
READY_S = 180
BIG = 32 << 20           # /big on the web service
ROTATION_S = 10          # the ProxyPool's salt epochs (manifests/synfleet.yaml)


@pytest.fixture(scope="module")
def cluster(lab_images, tmp_path_factory):
    require_bpf()
    require_kube()
    lab = LabCluster(tmp_path_factory.mktemp("cluster") / "lab")
    lab.up(images=lab_images)
    cgroups, netns = lab.cgroups.name, {ns.name for ns in lab.fabric.namespaces.values()}
    try:
        yield lab
    finally:
        lab.down()
        # Nothing of it is left: processes (with them the nodes' mounts), cgroups, namespaces.
        assert not CgroupTree(cgroups).exists(), [h for h in hierarchies() if (h / cgroups).exists()]
        assert not netns & namespaces()


@pytest.fixture(scope="module")
def installed(cluster):
    """The chart with only image values changed, nodes labelled, pools and a
    policy applied, the web service on the backends; everything Ready."""
    images = cluster.images
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=privileged")
    operator_repo, operator_tag = images.operator.ref.rsplit(":", 1)
    agent_repo, agent_tag = images.agent.ref.rsplit(":", 1)
    cluster.helm("install", "synfleet", str(ROOT / "charts" / "synfleet"), "--namespace", NAMESPACE,
                 "--set", f"image.repository={operator_repo}", "--set", f"image.tag={operator_tag}",
                 "--set", f"agentImage.repository={agent_repo}", "--set", f"agentImage.tag={agent_tag}")
    cluster.kubectl("label", "node", *PROXY_NODES, "synfleet.io/proxy=edge")
    cluster.kubectl("label", "node", *BACKEND_NODES, "synfleet.io/backend=web", "shop.example/web=true")
    cluster.kubectl("apply", "-f", str(MANIFESTS / "synfleet.yaml"))
    cluster.kubectl("apply", "-f", str(MANIFESTS / "web.yaml"))
    wait_until(lambda: cluster.kubectl("wait", "--for=condition=Ready", "--timeout=5s", "proxypool/edge",
                                       "backendpool/web", check=False).returncode == 0,
               "pools Ready", READY_S, 1)
    cluster.kubectl("wait", "--for=condition=Ready", f"--timeout={READY_S}s", "-n", "shop",
                    "synproxypolicy/storefront", timeout=READY_S + 10)
    cluster.kubectl("rollout", "status", "-n", "shop", "daemonset/web", f"--timeout={READY_S}s",
                    timeout=READY_S + 10)
    return cluster


def pods(cluster: LabCluster, namespace: str, selector: str) -> list[dict]:
    return json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]


def container_processes(cluster: LabCluster, node: str, command: str) -> list[int]:
    """Pids of processes of `node`'s pods whose command line contains `command`."""
    found = []
    for pid in cluster.cgroups.pids():
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{cluster.cgroups.name}/{node}/kubepods" in cgroup and command in cmdline:
            found.append(pid)
    return found


def synfleet_programs(cluster: LabCluster, node: str) -> dict:
    """What the node's eth0 runs and what its bpffs holds, asked inside the node."""
    # bpftool 7.1 predates tcx: it lists legacy clsact filters and XDP only.
    net = json.loads(cluster.nodes[node].run("bpftool", "-j", "net", "show", "dev", "eth0"))
    # bpftool names a TC program "<name>:[<id>]".
    names = {p["name"].split(":")[0] for entry in net for hook in ("tc", "xdp") for p in entry.get(hook, [])}
    with cluster.nodes[node].ns.entered():
        names |= {p.name for p in tcx_programs(socket.if_nametoindex("eth0"))}
    pins = cluster.nodes[node].run("sh", "-c", "ls -R /sys/fs/bpf/synfleet 2>/dev/null || true").split()
    return {"programs": {n for n in names if n.startswith("synfleet")}, "pins": pins}


def test_agent_pods_run_on_exactly_the_labelled_nodes_with_the_charts_security_context(installed):
    for role, nodes in (("proxy", PROXY_NODES), ("backend", BACKEND_NODES)):
        agents = pods(installed, NAMESPACE, f"synfleet.io/role={role}")
        assert sorted(p["spec"]["nodeName"] for p in agents) == sorted(nodes)
        assert all(p["status"]["phase"] == "Running" for p in agents)
        for node in nodes:
            (pid,) = container_processes(installed, node, "synfleet agent")
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            caps = int(status["CapEff"], 16)
            assert caps == (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON) | (1 << CAP_BPF), hex(caps)
            assert status["Seccomp"].strip() == "2"         # RuntimeDefault: a filter
            assert status["NoNewPrivs"].strip() == "1"
            root = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                        if line.split()[4] == "/")
            assert re.search(r"\bro\b", root.split()[5]), root
    # The operator runs in pods, with in-cluster configuration: it made the agents above.
    operators = pods(installed, NAMESPACE, "app.kubernetes.io/name=synfleet")
    assert len(operators) == 2 and all(p["status"]["phase"] == "Running" for p in operators)


def test_agents_attach_their_programs_in_their_own_node_and_report_it(installed):
    for node, program in [(n, "synfleet_proxy") for n in PROXY_NODES] + [(n, "synfleet_backend") for n in BACKEND_NODES]:
        seen = synfleet_programs(installed, node)
        assert program[:15] in seen["programs"], (node, seen)     # the kernel keeps 15 characters of a name
        assert seen["pins"], f"no pins in {node}'s bpffs"
    agents = json.loads(installed.kubectl("get", "nodeagents", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    ready = {a["spec"]["nodeName"] for a in agents
             if any(c["type"] == "Ready" and c["status"] == "True" for c in a["status"].get("conditions", []))}
    assert ready == {n.name for n in NODES}
    assert {p["hook"] for a in agents for p in a["status"]["programs"]} == {"tcx"}


def test_agent_metrics_listen_on_the_node_address_only_not_where_clients_reach(installed):
    for node in NODES:
        listening = installed.nodes[node.name].run("ss", "-Hltn", "sport = :9478").split()
        assert f"{node.address}:9478" in listening, (node.name, listening)
        assert not {"0.0.0.0:9478", "*:9478", "[::]:9478"} & set(listening), (node.name, listening)
    with installed.namespace("client").entered():
        sock = socket.socket()
    with sock:
        sock.settimeout(3)
        with pytest.raises(OSError):
            sock.connect((SERVICE_ADDRESS, 9478))


# ---- traffic: real clients in the client namespace, a flood from the attacker's ----

def get(cluster: LabCluster, path: str = "/", timeout: float = 3.0) -> tuple[bool, str]:
    """One HTTP/1.0 request over a fresh connection from the client namespace:
    (ok, the body or the error)."""
    with cluster.namespace("client").entered():
        sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.connect((SERVICE_ADDRESS, 80))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        return head.startswith(b"HTTP/1.1 200"), body.decode(errors="replace").strip()
    except OSError as err:
        return False, f"{type(err).__name__}: {err}"
    finally:
        sock.close()


class Clients:
    """A thread of back-to-back requests until stopped; every result kept."""

    def __init__(self, cluster: LabCluster, pause_s: float = 0.02) -> None:
        self.results: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, pause_s), daemon=True)

    def _run(self, cluster: LabCluster, pause_s: float) -> None:
        while not self._stop.is_set():
            self.results.append((time.monotonic(), *get(cluster)))
            self._stop.wait(pause_s)

    def __enter__(self) -> "Clients":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def failures(self) -> list[str]:
        return [body for _, ok, body in self.results if not ok]


def transfer(cluster: LabCluster, rate: str) -> subprocess.Popen:
    """curl downloading /big at the client's `rate`, from the client namespace."""
    return cluster.namespace("client").popen(
        "curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--limit-rate", rate, "--max-time", "120",
        f"http://{SERVICE_ADDRESS}/big", stdout=subprocess.PIPE, text=True)


def downloaded(proc: subprocess.Popen) -> int:
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, f"curl exited {proc.returncode}"
    return int(out)


def agent_counters(cluster: LabCluster, nodes: tuple[str, ...]) -> dict[str, float]:
    """The agents' data-plane counters, summed over `nodes`, from their metrics endpoints."""
    total: dict[str, float] = {}
    for node in nodes:
        address = next(n.address for n in NODES if n.name == node)
        text = cluster.nodes[node].run("curl", "-s", "-m", "5", f"http://{address}:9478/metrics")
        for m in re.finditer(r'^synfleet_dataplane_packets_total\{event="(\w+)".*\} (\S+)$', text, re.M):
            total[m.group(1)] = total.get(m.group(1), 0) + float(m.group(2))
    return total


def syncookies_sent(cluster: LabCluster, node: str) -> int:
    """The node kernel's own SYN cookies: what a SYN reaching a listener under a flood costs."""
    netstat = cluster.nodes[node].run("cat", "/proc/net/netstat").splitlines()
    names, values = netstat[0].split(), netstat[1].split()
    return int(dict(zip(names, values))["SyncookiesSent"])


def flood(cluster: LabCluster, rate: int, seconds: float) -> subprocess.Popen:
    """Spoofed SYNs from the attacker at the proxy the route points to (proxy-1)."""
    proxy_mac = cluster.namespace(PROXY_NODES[0]).mac("eth0")
    return cluster.namespace("attacker").popen(
        sys.executable, "-u", "-m", "synfleet_lab.generators", "--ifname", "eth0", "--dst-mac", proxy_mac,
        "--service", SERVICE_ADDRESS, "--port", "80", "--kind", "syn", "--rate", str(rate),
        "--duration", str(seconds), "--source-prefix", FLOOD_PREFIX, stdout=subprocess.PIPE, text=True)


def flood_sent(proc: subprocess.Popen) -> int:
    out, _ = proc.communicate(timeout=150)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]["sent"]


def test_real_clients_connect_through_the_proxies_while_a_syn_flood_hits_one(installed):
    backends_before = agent_counters(installed, BACKEND_NODES)
    cookies_before = sum(syncookies_sent(installed, n) for n in BACKEND_NODES)
    answered_before = agent_counters(installed, PROXY_NODES).get("syn_answered", 0)
    attack = flood(installed, rate=20_000, seconds=10)
    with Clients(installed) as clients:
        sent = flood_sent(attack)
    answered = agent_counters(installed, PROXY_NODES).get("syn_answered", 0) - answered_before
    assert sent >= 0.9 * 20_000 * 10 and answered >= 0.99 * sent, (sent, answered)
    assert len(clients.results) >= 100
    ok = sum(r[1] for r in clients.results) / len(clients.results)
    assert ok >= 0.99, clients.failures()[:5]
    # Both backends served (the body names the node), and no SYN reached their listeners.
    assert {body for _, good, body in clients.results if good} == set(BACKEND_NODES)
    backends = agent_counters(installed, BACKEND_NODES)
    assert backends.get("bypass_syn", 0) == backends_before.get("bypass_syn", 0)
    assert sum(syncookies_sent(installed, n) for n in BACKEND_NODES) == cookies_before
    # curl, through the proxies too.
    out = installed.namespace("client").run("curl", "-s", "-m", "5", f"http://{SERVICE_ADDRESS}/")
    assert out.strip() in BACKEND_NODES


def test_a_transfer_completes_through_the_other_proxy_when_its_proxy_node_is_lost(installed):
    download = transfer(installed, "4M")             # 8 s
    time.sleep(2)
    installed.set_link(PROXY_NODES[0], up=False)
    try:
        installed.route_via(PROXY_NODES[1])          # what routing does when a proxy disappears
        assert downloaded(download) == BIG
    finally:
        installed.set_link(PROXY_NODES[0], up=True)
        installed.route_via(PROXY_NODES[0])
    wait_until(lambda: get(installed)[0], "service through proxy-1 again", 60)


def test_a_rolling_restart_of_the_agents_loses_no_transfer_and_no_handshake(installed):
    download = transfer(installed, "1M")             # 32 s
    with Clients(installed, pause_s=0.1) as clients:
        installed.kubectl("rollout", "restart", "-n", NAMESPACE, "daemonset/synfleet-proxy-edge",
                          "daemonset/synfleet-backend-web")
        for ds in ("synfleet-proxy-edge", "synfleet-backend-web"):
            installed.kubectl("rollout", "status", "-n", NAMESPACE, f"daemonset/{ds}", f"--timeout={READY_S}s",
                              timeout=READY_S + 10)
        assert downloaded(download) == BIG
    assert len(clients.results) >= 50 and not clients.failures(), clients.failures()[:5]


def established_on(cluster: LabCluster, node: str) -> int:
    """Established connections of the web service on `node`."""
    return len(cluster.nodes[node].run("ss", "-Htn", "state", "established", "( sport = :80 )").splitlines())


def proxy_backends(cluster: LabCluster) -> list[str]:
    doc = yaml.safe_load(json.loads(cluster.kubectl(
        "get", "configmap", "-n", NAMESPACE, "synfleet-proxy-edge", "-o", "json").stdout)["data"]["dataplane.yaml"])
    return backend_set_of(doc, doc["policies"][0]["name"])["backends"]


def test_a_backend_node_leaving_the_pool_and_returning_loses_no_transfer(installed):
    """Daisy chaining in the real cluster: backend-1, relabelled out of the
    BackendPool, takes no new request but its transfers complete (backend-2,
    now their slots' owner, hands their segments back); relabelled in again,
    it joins and nothing is lost either."""
    leaving, staying = BACKEND_NODES
    size = 16 << 20
    downloads = [installed.namespace("client").popen(
        "curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "-r", f"0-{size - 1}", "--limit-rate", "1M",
        "--max-time", "120", f"http://{SERVICE_ADDRESS}/big", stdout=subprocess.PIPE, text=True)
        for _ in range(12)]                 # 16 s each
    time.sleep(2)
    assert established_on(installed, leaving) >= 1, "no transfer on the node that leaves"
    chained_before = agent_counters(installed, (staying,)).get("chained", 0)
    try:
        with Clients(installed, pause_s=0.1) as clients:
            installed.kubectl("label", "node", leaving, "synfleet.io/backend-")
            wait_until(lambda: proxy_backends(installed) == [installed.node_address(staying)],
                       "the proxies' table without the leaving node", 60, 0.2)
            drained_at = time.monotonic()
            # The pool's status is patched after the ConfigMap is written.
            draining = wait_until(lambda: json.loads(installed.kubectl(
                "get", "backendpool", "web", "-o", "json").stdout)["status"].get("draining"),
                "the pool's status naming the draining node", 30, 0.2)
            time.sleep(3)
            returning_at = time.monotonic()
            installed.kubectl("label", "node", leaving, "synfleet.io/backend=web")
            wait_until(lambda: len(proxy_backends(installed)) == 2, "the node back in the proxies' table", READY_S, 1)
        sizes = [downloaded(d) for d in downloads]
    finally:
        installed.kubectl("label", "node", leaving, "synfleet.io/backend=web", "--overwrite")
    assert sizes == [size] * 12
    assert len(clients.results) >= 30 and not clients.failures(), clients.failures()[:5]
    # Applied on the proxies within a second of the ConfigMap: no new request went to the drained node.
    during = {body for t, ok, body in clients.results if drained_at + 1 <= t <= returning_at}
    assert during == {staying}, during
    assert [(d["node"], d["reason"]) for d in draining] == [(leaving, "LeftPool")]
    assert agent_counters(installed, (staying,)).get("chained", 0) > chained_before
    installed.kubectl("rollout", "status", "-n", NAMESPACE, "daemonset/synfleet-backend-web",
                      f"--timeout={READY_S}s", timeout=READY_S + 10)


def test_clients_keep_connecting_with_the_operator_scaled_to_zero_for_five_epochs(installed):
    installed.kubectl("scale", "-n", NAMESPACE, "deployment/synfleet", "--replicas=0")
    installed.kubectl("wait", "-n", NAMESPACE, "--for=delete", "pod", "-l", "app.kubernetes.io/name=synfleet",
                      f"--timeout={READY_S}s", timeout=READY_S + 10)
    try:
        with Clients(installed, pause_s=0.2) as clients:
            time.sleep(6 * ROTATION_S)
    finally:
        installed.kubectl("scale", "-n", NAMESPACE, "deployment/synfleet", "--replicas=2")
        installed.kubectl("rollout", "status", "-n", NAMESPACE, "deployment/synfleet", f"--timeout={READY_S}s",
                          timeout=READY_S + 10)
    assert len(clients.results) >= 100 and not clients.failures(), clients.failures()[:5]
    assert agent_counters(installed, PROXY_NODES).get("salt_missing", 0) == 0


def test_deleting_the_pools_and_helm_uninstall_leave_every_node_bare(installed):
    installed.kubectl("delete", "-n", "shop", "synproxypolicy/storefront", "--timeout=120s", timeout=130)
    installed.kubectl("delete", "proxypool/edge", "backendpool/web", "--timeout=120s", timeout=130)
    installed.helm("uninstall", "synfleet", "--namespace", NAMESPACE, "--wait", "--timeout", "120s")
    for node in (n.name for n in NODES):
        assert synfleet_programs(installed, node) == {"programs": set(), "pins": []}, node
    wait_until(lambda: not pods(installed, NAMESPACE, "app.kubernetes.io/name=synfleet-agent"),
               "agent pods gone", 60)
