"""A real multi-node Kubernetes cluster on one machine, for running synfleet
as users do: `helm install`, `kubectl apply`, pods started by kubelets.

    host (control plane: kube-apiserver + etcd, controller manager, scheduler, on 10.89.0.1)
      |  veth
    switch namespace: bridge br0 ---- proxy-1, proxy-2, backend-1, backend-2 (nodes, 10.89.0.11-22)
                                 \\--- client, attacker (10.89.0.31, .32)

Each node is a network namespace and a mount namespace with its own
containerd, kubelet and kube-proxy (node.py) and a pod network (CNI bridge,
10.244.<n>.0/24, routed between nodes). Backend nodes carry the service
address on their loopback, as a direct-server-return load balancer's backends
do (docs/dataplane.md, node requirements); client and attacker reach it through
a proxy node.

`up()` builds what is missing (Kubernetes programs, images), brings it all up
and writes `state.json` into its directory; `down()` (the same object, or
`LabCluster.attach(dir)` from another process) removes every process, cgroup,
namespace, mount and file it made, and puts back the machine sysctls the
kubelets change."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from synfleet_lab.cluster.binaries import CACHE, kube_binaries
from synfleet_lab.cluster.cgroups import CgroupTree
from synfleet_lab.cluster.controlplane import SERVICE_CIDR, ControlPlane
from synfleet_lab.cluster.images import Image, ImageBuilder
from synfleet_lab.cluster.node import Node, NodeSpec
from synfleet_lab.testbed.fabric import Fabric
from synfleet_lab.testbed.netns import NetNS, home_namespace, whole_request

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DIR = Path("/tmp/synfleet-cluster")
HOST_ADDRESS = "10.89.0.1"
PREFIX_LEN = 24
NODES = (NodeSpec("proxy-1", "10.89.0.11", "10.244.1.0/24"), NodeSpec("proxy-2", "10.89.0.12", "10.244.2.0/24"),
         NodeSpec("backend-1", "10.89.0.21", "10.244.3.0/24"), NodeSpec("backend-2", "10.89.0.22", "10.244.4.0/24"))
PROXY_NODES = ("proxy-1", "proxy-2")
BACKEND_NODES = ("backend-1", "backend-2")
CLIENTS = {"client": "10.89.0.31", "attacker": "10.89.0.32"}
SERVICE_ADDRESS = "198.51.100.10"
# The attacker's spoofed sources: routed back to the attacker, so that no
# SYN+ACK to them leaves the fabric (the nodes have no default route either).
FLOOD_PREFIX = "10.66.0.0/16"
HOST_LINK = "sfk-host"
# Machine-wide sysctls every kubelet sets (pkg/kubelet/cm: setupKernelTunables): put back on down().
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
NODE_READY_TIMEOUT_S = 180


@dataclass(frozen=True)
class Images:
    agent: Image
    operator: Image
    web: Image
    pause: Image


def build_images(cache: Path = CACHE) -> Images:
    builder = ImageBuilder(cache, REPO)
    with home_namespace():      # Debian's mirror and PyPI are out there
        built = builder.build_all()
        return Images(agent=built["agent"], operator=built["operator"], web=builder.web(), pause=builder.pause())


def _host_link(command: str, *args, **kw):
    with home_namespace(), whole_request(), IPRoute() as ipr:
        return getattr(ipr, command)(*args, **kw)


class LabCluster:
    def __init__(self, workdir: Path = DEFAULT_DIR) -> None:
        self.dir = workdir
        self.state_file = workdir / "state.json"
        self.fabric: Fabric | None = None
        self.control: ControlPlane | None = None
        self.nodes: dict[str, Node] = {}
        self.cgroups: CgroupTree | None = None
        self.images: Images | None = None

    # ---- up ----

    def up(self, images: Images | None = None, progress=lambda *a: None) -> "LabCluster":
        if self.state_file.exists():
            raise RuntimeError(f"a lab cluster is up in {self.dir}: take it down first (synfleet cluster down)")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            # The control plane and its clients live in the machine's own
            # namespace, whichever one the calling thread is in (tests enter others).
            with home_namespace():
                self._up(images, progress)
        except BaseException as err:
            logs = self.log_tails()
            self.down()
            if isinstance(err, Exception):
                raise RuntimeError(f"lab cluster bring-up failed: {err}\n{logs}") from err
            raise
        return self

    def _up(self, images: Images | None, progress) -> None:
        progress("building (cached): Kubernetes programs, images")
        binaries = kube_binaries(("kube-apiserver-with-etcd", "kube-controller-manager", "kube-scheduler",
                                  "kubelet", "kube-proxy"))
        self.images = images or build_images()
        self._save_sysctls()
        self.cgroups = CgroupTree(f"synfleet-cluster-{secrets.token_hex(3)}")
        self.cgroups.create("control-plane", "daemons", *(n.name for n in NODES))
        progress("fabric: switch, nodes, client, attacker")
        self._fabric()
        self._write_state()
        progress("control plane")
        tokens = {secrets.token_hex(16): (f"system:node:{n.name}", "system:nodes") for n in NODES}
        proxy_token = secrets.token_hex(16)
        tokens[proxy_token] = ("system:kube-proxy", "system:node-proxier")
        self.control = ControlPlane(self.dir, address=HOST_ADDRESS, nodes=True, tokens=tokens,
                                    cgroup_procs=self.cgroups.procs_file("control-plane")).start()
        node_tokens = {user.split(":")[-1]: token for token, (user, _) in tokens.items()
                       if user.startswith("system:node:")}
        for spec in NODES:
            progress(f"node {spec.name}: containerd, kubelet, kube-proxy, images")
            node = Node(spec, self.fabric[spec.name], self.dir, self.cgroups, binaries, self.control.url,
                        self.control.ca_file, self.images.pause.ref)
            self.nodes[spec.name] = node
            node.start(node_tokens[spec.name], proxy_token)
            for image in (self.images.pause, self.images.agent, self.images.operator, self.images.web):
                node.import_image(image.archive)
        progress("waiting for the nodes to be Ready")
        wait_until(self._nodes_ready, "all nodes Ready", NODE_READY_TIMEOUT_S, 1.0)
        self._write_state()

    def _nodes_ready(self) -> bool:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        ready = {n["metadata"]["name"] for n in nodes
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))}
        return ready == {n.name for n in NODES}

    def log_tails(self, lines: int = 15) -> str:
        """The end of every log of the cluster: what to read when something did not come up."""
        out = []
        for log in sorted([*self.dir.glob("*.log"), *self.dir.glob("*/*.log")]) if self.dir.exists() else []:
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.relative_to(self.dir)}\n" + "\n".join(tail))
        return "\n".join(out)

    def _fabric(self) -> None:
        self.fabric = Fabric("sfk")
        with self.fabric.building():
            switch = self.fabric.add("switch")
            self.fabric.bridge(switch, "br0")
            _host_link("link", "add", ifname=HOST_LINK, kind="veth",
                       peer={"ifname": "p-host", "net_ns_fd": switch.name})
            index = _host_link("link_lookup", ifname=HOST_LINK)[0]
            _host_link("addr", "add", index=index, address=HOST_ADDRESS, prefixlen=PREFIX_LEN)
            _host_link("link", "set", index=index, state="up")
            switch.link_up("p-host")
            switch.set_master("p-host", "br0")
            for name, address in [(n.name, n.address) for n in NODES] + list(CLIENTS.items()):
                ns = self.fabric.add(name, rp_filter=name in CLIENTS)
                port = f"p-{name}"[:15]
                self.fabric.link(ns, "eth0", switch, port, [f"{address}/{PREFIX_LEN}"])
                switch.set_master(port, "br0")
                if name not in CLIENTS:
                    self._node_routes(name)
            # The host answers pods (the API server): routes back to each node's pod network.
            for n in NODES:
                _host_link("route", "add", dst=n.pod_cidr, gateway=n.address)
            for name in BACKEND_NODES:
                ns = self.fabric[name]
                ns.add_address("lo", f"{SERVICE_ADDRESS}/32")
                # The service address is the proxies' to announce, not the backends'.
                ns.sysctl("net.ipv4.conf.all.arp_ignore", 1)
                ns.sysctl("net.ipv4.conf.all.arp_announce", 2)
                ns.sysctl("net.ipv4.tcp_syncookies", 1)
            for name in PROXY_NODES:
                # Clients are on the proxies' own link: no redirect straight to a backend.
                self.fabric[name].sysctl("net.ipv4.conf.all.send_redirects", 0)
                self.fabric[name].sysctl("net.ipv4.conf.eth0.send_redirects", 0)
            for name in CLIENTS:
                self.fabric[name].sysctl("net.ipv4.conf.all.accept_redirects", 0)
            self.route_via(PROXY_NODES[0])

    def _node_routes(self, name: str) -> None:
        ns = self.fabric[name]
        ns.route("replace", FLOOD_PREFIX, CLIENTS["attacker"])
        # A node's own connections to a Service (in-cluster clients on the host
        # network) are routed before kube-proxy rewrites them: they need a route.
        ns.route("replace", SERVICE_CIDR, HOST_ADDRESS)
        for other in NODES:
            if other.name != name:
                ns.route("replace", other.pod_cidr, other.address)

    def set_link(self, node: str, up: bool) -> None:
        """A node's fabric link down (the node is lost to the network) or up
        again, with the routes that went down with it."""
        ns = self.fabric[node]
        ns.run("ip", "link", "set", "eth0", "up" if up else "down")
        if up:
            self._node_routes(node)

    def route_via(self, proxy: str) -> None:
        """Send client and attacker traffic for the service through `proxy`."""
        for name in CLIENTS:
            self.fabric[name].route("replace", f"{SERVICE_ADDRESS}/32", self.node_address(proxy))

    @staticmethod
    def node_address(name: str) -> str:
        return next(n.address for n in NODES if n.name == name)

    # ---- use ----

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        with home_namespace():
            return self.control.kubectl(*args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        with home_namespace():
            return self.control.helm(*args, check=check)

    def namespace(self, name: str) -> NetNS:
        return self.fabric[name]

    # ---- state, for `down` from another process ----

    def _write_state(self) -> None:
        self.state_file.write_text(json.dumps({
            "cgroups": self.cgroups.name,
            "namespaces": [ns.name for ns in self.fabric.namespaces.values()] if self.fabric else [],
            "sysctls": self._sysctls}))

    def _save_sysctls(self) -> None:
        self._sysctls = {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS
                         if Path("/proc/sys", k).exists()}

    @classmethod
    def attach(cls, workdir: Path = DEFAULT_DIR) -> "LabCluster":
        """The cluster that `up()` left in `workdir` (another process's), to take it down."""
        self = cls(workdir)
        state = json.loads(self.state_file.read_text())
        self.cgroups = CgroupTree(state["cgroups"])
        self._sysctls = state["sysctls"]
        self._orphans = state["namespaces"]
        return self

    # ---- down ----

    def down(self) -> None:
        """Remove everything, whatever state bring-up reached. Processes first
        (with them go the nodes' mount namespaces, and their mounts)."""
        errors: list[str] = []

        def attempt(what, step) -> None:
            try:
                step()
            except Exception as err:        # keep removing the rest; report at the end
                errors.append(f"{what}: {err}")

        if self.cgroups:
            attempt("processes and cgroups", self.cgroups.remove)
        if self.control:
            attempt("control plane", self.control.stop)
        for node in self.nodes.values():
            node.close()
        if self.fabric:
            attempt("namespaces", self.fabric.close)
        for name in getattr(self, "_orphans", ()):
            attempt(f"namespace {name}", lambda n=name: subprocess.run(["ip", "netns", "del", n], check=False))
        with contextlib.suppress(Exception):
            if _host_link("link_lookup", ifname=HOST_LINK):
                _host_link("link", "del", index=_host_link("link_lookup", ifname=HOST_LINK)[0])
        for key, value in getattr(self, "_sysctls", {}).items():
            attempt(f"sysctl {key}", lambda k=key, v=value: Path("/proc/sys", k).write_text(v))
        attempt("directory", lambda: shutil.rmtree(self.dir, ignore_errors=False) if self.dir.exists() else None)
        if errors:
            raise RuntimeError("lab cluster teardown left something: " + "; ".join(errors))

    def __enter__(self) -> "LabCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def wait_until(check, what: str, timeout: float = 60.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)
