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
from pathlib import Path

import pytest

from conftest import require_bpf, require_kube
from synfleet_lab.cluster.cgroups import CgroupTree, hierarchies
from synfleet_lab.cluster.cluster import BACKEND_NODES, NODES, PROXY_NODES, LabCluster, wait_until
from synfleet_lab.testbed.netns import namespaces

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "lab" / "synfleet_lab" / "cluster" / "manifests"
NAMESPACE = "synfleet-system"
# Capability bits (linux/capability.h): what the chart grants the agent, and nothing else.
CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
READY_S = 180


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
    cluster.kubectl("label", "node", *BACKEND_NODES, "synfleet.io/backend=web")
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
    net = json.loads(cluster.nodes[node].run("bpftool", "-j", "net", "show", "dev", "eth0"))
    # bpftool names a TC program "<name>:[<id>]".
    names = {p["name"].split(":")[0] for entry in net for hook in ("tc", "xdp") for p in entry.get(hook, [])
             if p.get("name", "").startswith("synfleet")}
    pins = cluster.nodes[node].run("sh", "-c", "ls -R /sys/fs/bpf/synfleet 2>/dev/null || true").split()
    return {"programs": names, "pins": pins}


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


def test_deleting_the_pools_and_helm_uninstall_leave_every_node_bare(installed):
    installed.kubectl("delete", "-n", "shop", "synproxypolicy/storefront", "--timeout=120s", timeout=130)
    installed.kubectl("delete", "proxypool/edge", "backendpool/web", "--timeout=120s", timeout=130)
    installed.helm("uninstall", "synfleet", "--namespace", NAMESPACE, "--wait", "--timeout", "120s")
    for node in (n.name for n in NODES):
        assert synfleet_programs(installed, node) == {"programs": set(), "pins": []}, node
    wait_until(lambda: not pods(installed, NAMESPACE, "app.kubernetes.io/name=synfleet-agent"),
               "agent pods gone", 60)
