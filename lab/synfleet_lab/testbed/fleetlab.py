"""A whole fleet in network namespaces, driven by real agent processes.

    client ─┐                      ┌─ proxy-a ─┐
    attacker┼── br0 (switch ns) ───┤           ├─ (encapsulated) ─┐
            │                      └─ proxy-b ─┘                  │
            └──────────── backend-a, backend-b  <─────────────────┘
                          (both own the service address on lo,
                           answer clients directly: DSR)

One L2 fabric (198.18.0.0/24, 2001:db8:18::/64). The client and the
attacker reach the service address (198.19.0.10, 2001:db8:19::10) through
proxy-a; `route_via("proxy-b")` moves them. With `http=True` the backends
run nginx (Debian's) instead of the greeting service. `set_protected(False)`
takes the service out of every node's configuration and routes it from the
proxies to both backends (ECMP on the 4-tuple): the same fabric without
synfleet's defence, the baseline of `synfleet bench http`. Agents join
their node's network namespace only (NetNS.popen), so they pin into the
host's /sys/fs/bpf under instance names unique to this lab. `close()` (also on errors, and from the context
manager) stops everything, uninstalls every instance and removes the
namespaces and the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from synfleet.agent.agent import uninstall
from synfleet.bpf import BpfObject, XdpHook
from synfleet.config import schema
from synfleet.cookie import MasterKey, current_epoch
from synfleet.resources import salts
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import SERVICE_PORT, testbed_config
from synfleet_lab.testbed.fabric import Fabric
from synfleet_lab.testbed.netns import NetNS

SERVICE = {4: "198.19.0.10", 6: "2001:db8:19::10"}
FLOOD_PREFIX = {4: "10.66.0.0/16", 6: "2001:db8:66::/48"}
METRICS_PORT = 9478
PROXIES = ("proxy-a", "proxy-b")
BACKENDS = ("backend-a", "backend-b")
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    server {{
        listen {v4}:{port} backlog=4096;
        listen [{v6}]:{port} backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""
HOSTS = {"client": 100, "attacker": 66, "proxy-a": 1, "proxy-b": 2, "backend-a": 11, "backend-b": 12}


@dataclass
class Node:
    name: str
    ns: NetNS
    v4: str
    v6: str
    mac: str = ""



@dataclass
class AgentProcess:
    node: Node
    role: str
    config_path: str
    instance: str
    log_path: str
    objects_dir: str | None = None
    proc: subprocess.Popen | None = None
    listen: str = f"127.0.0.1:{METRICS_PORT}"     # the agent's default

    def start(self, objects_dir: str | None = None) -> None:
        self.objects_dir = objects_dir or self.objects_dir
        extra = ["--objects", self.objects_dir] if self.objects_dir else []
        log = open(self.log_path, "ab")
        self.proc = self.node.ns.popen(sys.executable, "-m", "synfleet.cli", "agent",
                             "--role", self.role, "--config", self.config_path,
                             "--instance", self.instance, "--listen", self.listen,
                             *extra, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def http(self, path: str) -> tuple[int, str]:
        return self.node.ns.http_get(f"http://{self.listen}{path}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.instance} exited {self.proc.returncode}: {self.log()}")
            if self.http("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"agent {self.instance} not ready after {timeout}s: {self.http('/readyz')}")

    def metrics(self) -> dict[str, float]:
        """Data-plane packet counters by event, plus the agent's own gauges by name."""
        status, text = self.http("/metrics")
        if status != 200:
            raise RuntimeError(f"metrics of {self.instance}: {status} {text}")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            if name == "synfleet_dataplane_packets_total":
                name = name_labels.split('event="', 1)[1].split('"', 1)[0]
            out[name] = float(value)
        return out

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]


@dataclass
class Flood:
    """A running flood process (synfleet_lab.generators, a PacketSocketGenerator) in the attacker namespace."""

    proc: subprocess.Popen

    def wait(self, timeout: float = 150) -> int:
        """Wait for it to end; the number of frames it sent (as of its last
        report, if it was interrupted)."""
        out, _ = self.proc.communicate(timeout=timeout)
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return reports[-1]["sent"] if reports else 0


class SaltPublisher:
    """What the operator does for salts (synfleet.resources.salts): the pool's
    master keys in every proxy's file, the next generation announced ahead of
    its turn. Between generations nothing is written: the agents derive each
    epoch's salt themselves. Between `pause()` and `resume()` the control plane
    is away (and `keys` may be set by hand)."""

    def __init__(self, lab: "FleetLab") -> None:
        self.lab = lab
        self.keys: list[MasterKey] = []
        self._paused = False
        self._lock = threading.Lock()     # a publish in flight finishes before a pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="salts")

    def epoch(self) -> int:
        return current_epoch(self.lab.rotation_s)

    def publish(self) -> None:
        with self._lock:
            if self._paused:
                return
            wanted = salts.rotate(self.keys, self.epoch(), self.lab.rotation_s, self.lab.master_rotation_s)
            if wanted != self.keys:
                self.keys = wanted
                self.lab.write_proxy_configs()

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self.publish()

    def _run(self) -> None:
        while not self._stop.wait(min(0.2, self.lab.rotation_s / 10)):
            self.publish()

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@dataclass
class FleetLab:
    rotation_s: int = 60
    master_rotation_s: int = 86400     # a generation of the pool's master key (ProxyPool salt.masterRotationSeconds)
    failure_policy: str = "open"       # the proxies' failurePolicy
    mode: str = "enforce"
    xdp: bool = False       # the proxies' XDP front (node.xdp)
    peer_xdp: bool = True   # the switch ports facing the proxies run XDP (else XDP_TX frames are lost)
    clock_offsets: dict[str, float] = field(default_factory=dict)
    metrics_on_node: bool = False   # agents' metrics on their node's address (a scraper on the switch reaches them)
    http: bool = False      # nginx on the backends instead of synfleet_lab.testbed.service
    protected: bool = True  # the service in the nodes' configurations
    pool: tuple[str, ...] = BACKENDS    # the backends the proxies' policies list (set_pool changes it)
    nodes: dict[str, Node] = field(default_factory=dict)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    servers: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fabric = Fabric("sf")
        self.tag = self.fabric.prefix.removeprefix("sf-")
        self.workdir = tempfile.mkdtemp(prefix=f"synfleet-lab-{self.tag}-")
        self.switch: NetNS | None = None
        self.salts = SaltPublisher(self)
        self.via: str | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- topology ----

    def _build(self) -> None:
        self.switch = self.fabric.add("sw")
        self.fabric.bridge(self.switch, "br0")
        for name, host in HOSTS.items():
            ns = self.fabric.add(name, router=name in PROXIES, rp_filter=False)
            node = Node(name, ns, f"198.18.0.{host}", f"2001:db8:18::{host:x}")
            self.nodes[name] = node
            port = f"p-{name}"[:15]
            self.fabric.link(ns, "eth0", self.switch, port, [f"{node.v4}/24", f"{node.v6}/64"])
            self.switch.set_master(port, "br0")
            node.mac = ns.mac("eth0")
        for name in PROXIES:
            ns = self.nodes[name].ns
            # A proxy that routes (the unprotected baseline) onto the link it
            # received from would teach the client a redirect straight to a
            # backend, which outlives the baseline.
            ns.sysctl("net.ipv4.conf.all.send_redirects", 0)
            ns.sysctl("net.ipv4.conf.eth0.send_redirects", 0)
        for name in ("client", "attacker"):
            for key in ("net.ipv4.conf.all.accept_redirects", "net.ipv6.conf.all.accept_redirects",
                        "net.ipv6.conf.eth0.accept_redirects"):
                self.nodes[name].ns.sysctl(key, 0)
        for name in BACKENDS:
            ns = self.nodes[name].ns
            ns.sysctl("net.ipv4.tcp_syncookies", 1)
            for fam in (4, 6):
                ns.add_address("lo", SERVICE[fam])
        # Permanent neighbours: nobody waits for ARP/ND mid-test, and the
        # attacker never answers for its spoofed sources.
        self.fabric.pin_neighbours((a.ns, "eth0", address, b.mac) for a in self.nodes.values()
                                   for b in self.nodes.values() if a is not b for address in (b.v4, b.v6))
        if self.xdp and self.peer_xdp:
            # A veth takes its peer's XDP_TX frames only with a native XDP program of its own.
            with BpfObject(lab_object("xdp_pass")).load() as peer, self.switch.entered():
                for name in PROXIES:
                    XdpHook(socket.if_nametoindex(f"p-{name}"[:15])).attach(peer.program("xdp_pass"))
        self.route_via("proxy-a")

    def route_via(self, proxy: str) -> None:
        """Send client and attacker traffic for the service through `proxy`."""
        gw = self.nodes[proxy]
        for name in ("client", "attacker"):
            ns = self.nodes[name].ns
            ns.route("replace", SERVICE[4], gw.v4)
            ns.route("replace", SERVICE[6], gw.v6)
        self.via = proxy

    # ---- configuration and agents ----

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.yaml")

    def proxy_config(self, name: str) -> schema.DataplaneConfig:
        node = self.nodes[name]
        backends = {fam: [getattr(self.nodes[b], f"v{fam}") for b in self.pool] for fam in (4, 6)}
        return testbed_config("proxy", interfaces=["eth0"], node_v4=node.v4, node_v6=node.v6,
                              services=self._services(), rotation_s=self.rotation_s, backends=backends,
                              salt_keys=self.salts.keys, failure_policy=self.failure_policy, mode=self.mode,
                              clock_offset_s=self.clock_offsets.get(name, 0.0), xdp=self.xdp)

    def backend_config(self, name: str) -> schema.DataplaneConfig:
        node = self.nodes[name]
        proxies = [a for p in PROXIES for a in (self.nodes[p].v4, self.nodes[p].v6)]
        return testbed_config("backend", interfaces=["eth0"], node_v4=node.v4, node_v6=node.v6,
                              services=self._services(), rotation_s=self.rotation_s,
                              allowed_proxies=proxies, mode=self.mode,
                              peer_backends=[a for b in BACKENDS for a in (self.nodes[b].v4, self.nodes[b].v6)])

    def _services(self) -> dict[int, str]:
        return SERVICE if self.protected else {}

    def set_protected(self, protected: bool) -> None:
        """Protect the service (synfleet's path) or not (the proxies route it to
        the backends, whose kernels defend with their own SYN cookies); returns
        once every agent has applied its new configuration."""
        if protected == self.protected:
            return
        generations = {n: a.metrics()["synfleet_config_generation"] for n, a in self.agents.items()}
        self.protected = protected
        for name in PROXIES:
            ns = self.nodes[name].ns
            for fam in (4, 6):
                if protected:
                    ns.route("del", SERVICE[fam])
                    continue
                ns.sysctl(f"net.ipv{fam}.fib_multipath_hash_policy", 1)
                ns.route("replace", SERVICE[fam], [getattr(self.nodes[b], f"v{fam}") for b in BACKENDS])
        self.write_backend_configs()
        self.write_proxy_configs()
        self._wait_applied(generations)

    def set_pool(self, backends: tuple[str, ...]) -> None:
        """The backends the proxies send to (a backend joins, or leaves); returns
        once both proxies applied it."""
        generations = {n: self.agents[n].metrics()["synfleet_config_generation"] for n in PROXIES}
        self.pool = backends
        self.write_proxy_configs()
        self._wait_applied(generations)

    def _wait_applied(self, generations: dict[str, float]) -> None:
        for name, generation in generations.items():
            agent = self.agents[name]
            deadline = time.monotonic() + 10
            while agent.metrics()["synfleet_config_generation"] <= generation:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}'s agent did not apply its configuration:\n{agent.log()}")
                time.sleep(0.05)

    def write_config(self, name: str, text: str) -> None:
        """Atomically, as a ConfigMap volume or a careful operator would."""
        tmp = self._path(name) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self._path(name))

    def write_proxy_configs(self) -> None:
        for name in PROXIES:
            self.write_config(name, self.proxy_config(name).to_yaml())

    def write_backend_configs(self) -> None:
        for name in BACKENDS:
            self.write_config(name, self.backend_config(name).to_yaml())

    def set_mode(self, mode: str) -> None:
        """Every node's policies to enforce or monitor; agents pick it up from the files."""
        self.mode = mode
        self.write_backend_configs()
        self.write_proxy_configs()

    def start(self) -> "FleetLab":
        self.salts.start()
        self.write_backend_configs()
        for name in BACKENDS:
            self.servers.append(self._nginx(name) if self.http else self._greeter(name))
        for name in PROXIES + BACKENDS:
            role = "proxy" if name in PROXIES else "backend"
            agent = AgentProcess(self.nodes[name], role, self._path(name), f"lab-{self.tag}-{name}",
                                 os.path.join(self.workdir, f"{name}.log"))
            if self.metrics_on_node:
                agent.listen = f"{self.nodes[name].v4}:{METRICS_PORT}"
            self.agents[name] = agent
            agent.start()
        for name, server in zip(BACKENDS, self.servers):
            self._wait_serving(name, server)
        for agent in self.agents.values():
            agent.wait_ready()
        return self

    def _greeter(self, name: str) -> subprocess.Popen:
        return self.nodes[name].ns.popen(sys.executable, "-m", "synfleet_lab.testbed.service",
                        "--name", name, "--port", str(SERVICE_PORT), SERVICE[4], SERVICE[6],
                        stdout=subprocess.PIPE)

    def _nginx(self, name: str) -> subprocess.Popen:
        """One process (no master: killing it leaves no worker behind) answering
        every request `200 <backend>`, no access log; nginx's files in the lab's
        directory."""
        prefix = os.path.join(self.workdir, f"nginx-{name}")
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(NGINX_CONF.format(prefix=prefix, port=SERVICE_PORT, v4=SERVICE[4], v6=SERVICE[6],
                                      name=name))
        self.nodes[name].ns.sysctl("net.core.somaxconn", 4096)
        return self.nodes[name].ns.popen("nginx", "-p", prefix, "-c", conf,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _wait_serving(self, name: str, server: subprocess.Popen) -> None:
        if not self.http:
            if server.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the service on {name} failed to start")
            return
        deadline = time.monotonic() + 10
        while not self.nodes[name].ns.listening(SERVICE_PORT):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx on {name} failed to start: {server.stderr.read().decode()}")
            time.sleep(0.05)

    def restart_agent(self, name: str, sig: int = signal.SIGKILL, objects_dir: str | None = None) -> None:
        agent = self.agents[name]
        agent.signal(sig)
        agent.start(objects_dir)
        agent.wait_ready()

    def counters(self, names: tuple[str, ...]) -> dict[str, float]:
        """Data-plane counters summed over the named nodes' agents."""
        total: dict[str, float] = {}
        for name in names:
            for k, v in self.agents[name].metrics().items():
                total[k] = total.get(k, 0.0) + v
        return total

    # ---- traffic ----

    def flood(self, kind: str = "syn", rate: int = 20000, duration: float = 10.0,
              target: str | None = None, family: int = 4, seed: int | None = None) -> Flood:
        """Start a bounded flood from the attacker at `target` (default: the
        proxy the route points to)."""
        target_node = self.nodes[target or self.via]
        return Flood(self.nodes["attacker"].ns.popen(sys.executable, "-u", "-m", "synfleet_lab.generators",
                        "--ifname", "eth0", "--dst-mac", target_node.mac, "--service", SERVICE[family],
                        "--port", str(SERVICE_PORT), "--kind", kind, "--rate", str(rate),
                        "--duration", str(duration), "--source-prefix", FLOOD_PREFIX[family],
                        *(["--seed", str(seed)] if seed is not None else []),
                        stdout=subprocess.PIPE, text=True))

    def client_socket(self, family: int = 4, node: str = "client") -> socket.socket:
        """A TCP socket created inside the client namespace (it stays there)."""
        with self.nodes[node].ns.entered():
            return socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)

    # ---- teardown ----

    def close(self) -> None:
        self.salts.stop()
        for agent in self.agents.values():
            if agent.proc and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            try:
                agent.signal(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                agent.signal(signal.SIGKILL)
        for server in self.servers:
            server.kill()
            server.wait()
        for name, agent in self.agents.items():
            with self.nodes[name].ns.entered():
                uninstall(agent.instance)
        self.fabric.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "FleetLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
