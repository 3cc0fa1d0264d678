"""One Kubernetes node of the lab cluster: a network namespace and a mount
namespace of its own, with a real containerd (Debian's, with runc and the
CNI plugins), kubelet and kube-proxy in them.

Why both namespaces: a hostNetwork pod shares the network namespace of the
containerd that started it, so containerd runs in the node's; and a hostPath
names a path of the kubelet's mount namespace, so each node mounts its own
bpffs at /sys/fs/bpf (the agents' pins of two nodes must not meet) and its own
/run/containerd, /var/log/containers and /var/lib/cni (paths containerd and
kubelet do not let one configure). Everything mounted there vanishes with the
namespace. Processes are tracked by cgroup (see cgroups.py), so stopping a node
also stops the container processes and shims that its daemons started."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from synfleet_lab.cluster.cgroups import CgroupTree, joining
from synfleet_lab.testbed.netns import NetNS

CNI_BIN = "/usr/lib/cni"
# Mounted privately in every node: per-node state at paths fixed in the programs.
PRIVATE_DIRS = ("/run/containerd", "/var/log/containers", "/var/lib/cni")
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str        # on the fabric
    pod_cidr: str


class Node:
    def __init__(self, spec: NodeSpec, ns: NetNS, workdir: Path, cgroups: CgroupTree, binaries: dict[str, Path],
                 apiserver: str, ca_file: Path, sandbox_image: str) -> None:
        self.spec = spec
        self.ns = ns
        self.dir = workdir / spec.name
        self.cgroups = cgroups
        self.binaries = binaries
        self.apiserver = apiserver
        self.ca_file = ca_file
        self.sandbox_image = sandbox_image
        self.socket = self.dir / "containerd.sock"
        self._holder: subprocess.Popen | None = None
        self._logs: list = []

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cgroup_root(self) -> str:
        """The kubelet's --cgroup-root: every pod of this node is below it."""
        return self.cgroups.path(self.name)

    # ---- processes in the node ----

    def command(self, *args: str) -> list[str]:
        """`args` as a process of this node (its network and mount namespaces)."""
        return ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", f"--net=/run/netns/{self.ns.name}", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)} on {self.name} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        self._logs.append(log)
        subprocess.Popen(joining(self.cgroups.procs_file("daemons"), name, self.command(*args)),
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    # ---- bring-up ----

    def start(self, kubelet_token: str, proxy_token: str) -> None:
        """Start containerd, kubelet and kube-proxy."""
        for sub in ("containerd", "kubelet", "pod-logs", "net.d", "cni-ipam"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        ns = self.ns
        ns.sysctl("net.ipv4.conf.all.forwarding", 1)
        ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        mounts = " && ".join([f"mount -t tmpfs tmpfs {d}" for d in PRIVATE_DIRS] + [
            # Not stacked on the host's bpffs: containerd judges the propagation of the
            # first mount it finds there (HostToContainer needs shared or slave).
            "{ ! mountpoint -q /sys/fs/bpf || umount /sys/fs/bpf; }",
            "mount -t bpf bpf /sys/fs/bpf", "mount --make-shared /sys/fs/bpf"])
        for d in PRIVATE_DIRS:
            Path(d).mkdir(parents=True, exist_ok=True)
        self._holder = subprocess.Popen(
            joining(self.cgroups.procs_file("daemons"), "holder", [
                "nsenter", f"--net=/run/netns/{ns.name}", "unshare", "--mount", "--propagation", "private",
                "sh", "-c", f"{mounts} && exec sleep infinity"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        # The holder execs sleep only once its mounts are made (the host has a bpffs too).
        while self._holder_command() != "sleep\0infinity\0":
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: its mount namespace did not come up")
            time.sleep(0.05)
        self._write_configs(kubelet_token, proxy_token)
        self._daemon("containerd", "containerd", "--config", str(self.dir / "containerd.toml"))
        self._wait(lambda: self.socket.exists(), "containerd's socket")
        self._daemon("kubelet", str(self.binaries["kubelet"]), "--config", str(self.dir / "kubelet.yaml"),
                     "--kubeconfig", str(self.dir / "kubelet.kubeconfig"), "--hostname-override", self.name,
                     "--node-ip", self.spec.address, "--root-dir", str(self.dir / "kubelet"), "--v=1")
        self._daemon("kube-proxy", str(self.binaries["kube-proxy"]), "--config", str(self.dir / "kube-proxy.yaml"))

    def _holder_command(self) -> str:
        try:
            return Path(f"/proc/{self._holder.pid}/cmdline").read_text()
        except OSError:
            return ""

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: no {what} after {READY_TIMEOUT_S} s; see {self.dir}/*.log")
            time.sleep(0.2)

    def import_image(self, archive: Path) -> None:
        self.run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", "images", "import",
                 str(archive), timeout=300)

    def _kubeconfig(self, path: Path, token: str) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": self.apiserver,
                                                     "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "node", "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "node"}}]}))

    def _write_configs(self, kubelet_token: str, proxy_token: str) -> None:
        d = self.dir
        self._kubeconfig(d / "kubelet.kubeconfig", kubelet_token)
        self._kubeconfig(d / "kube-proxy.kubeconfig", proxy_token)
        (d / "net.d" / "10-lab.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "lab", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.spec.pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "containerd.toml").write_text(f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[{cri}]
  sandbox_image = "{self.sandbox_image}"
  netns_mounts_under_state_dir = true
  # The machine lacks CAP_SYS_RESOURCE (NOTES.md): nobody may lower an
  # oom_score_adj, and runc fails on the -998 kubelet asks for sandboxes.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d}/containerd/runc"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{d}/net.d"
""")
        (d / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # The machine has cgroup v1 only (NOTES.md); kubelet >= 1.35 refuses it unless told.
            "failCgroupV1": False, "failSwapOn": False,
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": self.spec.address, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            # A lab: the API server reaches kubelets (logs, exec) without client certificates.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(d / "pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            # Four kubelets share one disk: only a truly full one is pressure.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "maxPods": 30,
            "nodeStatusUpdateFrequency": "4s"}))
        (d / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name, "mode": "iptables", "clusterCIDR": "10.244.0.0/16",
            "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # nf_conntrack_max is the machine's, not the node's: leave it.
            "conntrack": {"maxPerCore": 0, "min": 0}}))

    # ---- teardown ----

    def close(self) -> None:
        """The node's processes are stopped with its cgroups (the cluster does
        that); here only what this object opened."""
        for log in self._logs:
            log.close()
        self._logs.clear()
