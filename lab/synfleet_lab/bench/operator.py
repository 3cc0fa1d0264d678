"""`synfleet bench operator`: the operator at cluster scale, against the real
API server and etcd of the test control plane. No kubelet or controller runs
but the garbage collector: the bench writes Nodes, Services, EndpointSlices,
agent pods and DaemonSet status as their controllers would, then starts
`synfleet operator` (as the chart's ServiceAccount) on the finished cluster.

Phases: the initial sync (operator start -> every policy in its pools'
ConfigMaps); a quiet phase of unrelated Service/EndpointSlice updates only
(every render there came from one of them: the aim is none); the load phase,
unrelated updates plus policy changes (a policy's mode flipped), each timed
from its PATCH to the moment a watch on the operator's ConfigMaps sees the
new mode in both of the policy's pools' documents."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from synfleet import contract
from synfleet.config import yamltext
from synfleet.config.schema import Role
from synfleet.resources import names
from synfleet_lab.cluster.controlplane import ADMIN_TOKEN, ControlPlane
from synfleet_lab.cluster.operator import OperatorProcess

CHART = Path(__file__).resolve().parents[3] / "charts" / "synfleet"
NAMESPACE = "synfleet-system"
RELEASE = "synfleet"
APP_NAMESPACES = 10
AGENT_SA = "bench-agent"
WRITERS = 8
SYNC_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 60.0
WATCH_S = 10
AIMS = {"render_p99_ms": 2000.0, "operator_peak_rss_mib": 300.0, "renders_from_unrelated_events": 0}


@dataclass(frozen=True)
class Size:
    nodes: int = 2000
    proxies: int = 20
    backends: int = 500
    pools: int = 4                 # proxy pools, and as many backend pools
    services: int = 20000
    policies: int = 1000
    seconds: float = 60.0          # the load phase
    quiet_seconds: float = 10.0    # unrelated updates only
    unrelated_per_s: float = 50.0
    changes_per_s: float = 5.0

    def check(self) -> None:
        if self.proxies + self.backends > self.nodes:
            raise ValueError(f"{self.proxies} proxies and {self.backends} backends need more than {self.nodes} nodes")
        if self.policies >= self.services:
            raise ValueError("every policy protects its own Service, and unrelated ones must remain")
        if min(self.proxies, self.backends) < self.pools:
            raise ValueError(f"each of the {self.pools} pools needs a node")


class NotFound(LookupError):
    pass


class Api:
    """Raw JSON requests over one kept-alive HTTPS connection per thread:
    the bench writes tens of thousands of objects."""

    def __init__(self, cluster: ControlPlane) -> None:
        self.host, self.port = cluster.address, cluster.port
        self.ctx = ssl.create_default_context(cafile=cluster.ca_file)
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPSConnection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
        return self._local.conn

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json") -> dict:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": content_type}
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, data, headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                continue
            if resp.status == 404:
                raise NotFound(f"{method} {path}")
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
            return json.loads(payload)
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def watch(self, path: str, resource_version: str, stop: threading.Event):
        """Watch events of a collection until `stop` (checked at least every
        WATCH_S: the server ends each stream then, and it is reopened)."""
        while not stop.is_set():
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=WATCH_S + 30)
            try:
                conn.request("GET", f"{path}?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_S}"
                                    f"&resourceVersion={resource_version}",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                resp = conn.getresponse()
                for line in resp:
                    event = json.loads(line)
                    resource_version = event["object"]["metadata"].get("resourceVersion", resource_version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        yield event["object"]
                    if stop.is_set():
                        return
            except (OSError, http.client.HTTPException):
                time.sleep(0.5)     # reopened from the last version seen
            finally:
                conn.close()


def _spread(api: Api, fn, items) -> None:
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(fn, items):
            pass


# ---- the cluster's objects, as their controllers would write them ----

def _role_of(i: int, size: Size) -> tuple[str, str] | None:
    """Node i's (label, pool) if it is in a pool."""
    if i < size.proxies:
        return "synfleet.io/proxy", f"edge-{i % size.pools}"
    if i < size.proxies + size.backends:
        return "synfleet.io/backend", f"web-{i % size.pools}"
    return None


def _node_name(i: int) -> str:
    return f"node-{i:05d}"


def _node_address(i: int) -> str:
    return f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def _add_node(api: Api, i: int, size: Size) -> None:
    role = _role_of(i, size)
    labels = {"kubernetes.io/hostname": _node_name(i), **({role[0]: role[1]} if role else {})}
    api.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": _node_name(i), "labels": labels}})
    api.patch(f"/api/v1/nodes/{_node_name(i)}/status", {"status": {
        "addresses": [{"type": "InternalIP", "address": _node_address(i)}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench",
                        "lastHeartbeatTime": "2026-12-03T00:00:00Z", "lastTransitionTime": "2026-12-03T00:00:00Z"}]}})


def _add_agent_pod(api: Api, i: int, size: Size) -> None:
    pool = _role_of(i, size)[1]
    name = f"synfleet-backend-{pool}-{_node_name(i)}"
    api.post(f"/api/v1/namespaces/{NAMESPACE}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": names.labels(Role.BACKEND, pool)},
        "spec": {"nodeName": _node_name(i), "serviceAccountName": AGENT_SA,
                 "containers": [{"name": "agent", "image": "ghcr.io/synfleet/agent:bench"}]}})
    api.patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status", {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})


def _service_namespace(i: int) -> str:
    return f"bench-{i % APP_NAMESPACES}"


def _service_name(i: int) -> str:
    return f"svc-{i:05d}"


def _add_service(api: Api, i: int, size: Size) -> None:
    ns, name = _service_namespace(i), _service_name(i)
    spec = {"ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}
    if i < size.policies:    # a protected Service: its external address is what its policy protects
        spec["externalIPs"] = [f"198.18.{i // 250}.{i % 250 + 1}"]
    api.post(f"/api/v1/namespaces/{ns}/services", {"apiVersion": "v1", "kind": "Service",
                                                    "metadata": {"name": name, "namespace": ns}, "spec": spec})
    backend = size.proxies + i % size.backends
    api.post(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", _endpoint_slice(i, backend, True))


def _endpoint_slice(i: int, node: int, ready: bool) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{_service_name(i)}-1", "namespace": _service_namespace(i),
                         "labels": {"kubernetes.io/service-name": _service_name(i)}},
            "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.244.{i // 250 % 250}.{i % 250 + 1}"], "nodeName": _node_name(node),
                           "conditions": {"ready": ready}}]}


def _policy_name(i: int) -> str:
    return f"pol-{i:05d}"


def _add_policy(api: Api, i: int, size: Size) -> None:
    ns = _service_namespace(i)
    api.post(f"/apis/{contract.API_VERSION}/namespaces/{ns}/synproxypolicies", {
        "apiVersion": contract.API_VERSION, "kind": "SynProxyPolicy",
        "metadata": {"name": _policy_name(i), "namespace": ns},
        "spec": {"service": {"name": _service_name(i)}, "ports": [443], "mode": "enforce",
                 "proxyPool": f"edge-{i % size.pools}", "backendPool": f"web-{i % size.pools}"}})


def _pools(api: Api, size: Size) -> None:
    for k in range(size.pools):
        for kind, plural, label, name in (("ProxyPool", "proxypools", "synfleet.io/proxy", f"edge-{k}"),
                                          ("BackendPool", "backendpools", "synfleet.io/backend", f"web-{k}")):
            api.post(f"/apis/{contract.API_VERSION}/{plural}", {
                "apiVersion": contract.API_VERSION, "kind": kind, "metadata": {"name": name},
                "spec": {"nodeSelector": {label: name}, "interface": "eth0"}})


def _eventually(request, timeout: float = SETTLE_TIMEOUT_S):
    """The request's answer once the object exists (the operator writes it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request()
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _rollouts(api: Api, size: Size) -> None:
    """What the DaemonSet controller would report once every agent runs."""
    for k in range(size.pools):
        for role, label_count in ((Role.PROXY, size.proxies), (Role.BACKEND, size.backends)):
            pool = f"edge-{k}" if role is Role.PROXY else f"web-{k}"
            n = len(range(k, label_count, size.pools))
            path = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{names.agent_name(role, pool)}"
            generation = _eventually(lambda: api.request("GET", path))["metadata"]["generation"]
            api.patch(path + "/status", {"status": {
                "currentNumberScheduled": n, "desiredNumberScheduled": n, "numberMisscheduled": 0,
                "numberReady": n, "updatedNumberScheduled": n, "numberAvailable": n,
                "observedGeneration": generation}})


# ---- what the bench observes ----

class Changes:
    """Policy changes in flight, and when both of each one's ConfigMaps showed it."""

    def __init__(self, size: Size) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[str, float, set[str]]] = {}   # policy -> (mode, sent, ConfigMaps left)
        self.latencies: list[float] = []
        self.rendered: dict[str, set[str]] = {}     # ConfigMap -> policies it holds

    def sent(self, i: int, mode: str) -> None:
        key = f"{_service_namespace(i)}/{_policy_name(i)}"
        cms = {names.agent_name(Role.PROXY, f"edge-{i % self.size.pools}"),
               names.agent_name(Role.BACKEND, f"web-{i % self.size.pools}")}
        with self.lock:
            self.pending[key] = (mode, time.monotonic(), cms)

    def seen(self, configmap: dict) -> None:
        name = configmap["metadata"]["name"]
        text = (configmap.get("data") or {}).get(contract.CONFIG_KEY)
        if not text:
            return
        modes = {p["name"]: p["mode"] for p in yamltext.load(text).get("policies") or []}
        now = time.monotonic()
        with self.lock:
            self.rendered[name] = set(modes)
            for key, (mode, at, left) in list(self.pending.items()):
                if name in left and modes.get(key) == mode:
                    left.discard(name)
                    if not left:
                        self.latencies.append(now - at)
                        del self.pending[key]

    def policies_in_proxy_documents(self) -> int:
        with self.lock:
            return sum(len(p) for cm, p in self.rendered.items() if cm.startswith("synfleet-proxy-"))


class Operator:
    def __init__(self, proc: OperatorProcess) -> None:
        self.proc = proc
        self.ticks = os.sysconf("SC_CLK_TCK")

    def metric_sum(self, name: str) -> float:
        total = 0.0
        for family in text_string_to_metric_families(self.proc.metrics()):
            total += sum(s.value for s in family.samples if s.name == name)
        return total

    def errors(self) -> dict[str, int]:
        return self._by_label("synfleet_operator_errors_total", "stage")

    def render_requests(self) -> dict[str, int]:
        return self._by_label("synfleet_operator_render_requests_total", "cause")

    def api_requests(self) -> dict[str, int]:
        """By "verb kind" (e.g. "apply ConfigMap")."""
        return self._by_label("synfleet_operator_api_requests_total", "verb", "kind")

    def _by_label(self, sample_name: str, *labels: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for family in text_string_to_metric_families(self.proc.metrics()):
            for sample in family.samples:
                if sample.name == sample_name:
                    found[" ".join(sample.labels[label] for label in labels)] = int(sample.value)
        return found

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks

    def peak_rss_mib(self) -> float:
        return self._status_mib("VmHWM")

    def rss_mib(self) -> float:
        return self._status_mib("VmRSS")

    def rss_parts_mib(self) -> dict[str, float]:
        """What the resident memory is made of (/proc/pid/smaps): the malloc
        heap, other anonymous mappings (Python's object arenas, thread arenas
        and stacks) and mapped files (the interpreter and its libraries)."""
        parts = {"heap": 0, "anonymous": 0, "files": 0}
        part = "anonymous"
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:    # a mapping's first line: its range and path
                path = fields[5] if len(fields) > 5 else ""
                part = "heap" if path == "[heap]" else "files" if path.startswith("/") else "anonymous"
            elif fields[0] == "Rss:":
                parts[part] += int(fields[1])
        return {k: round(v / 1024, 1) for k, v in parts.items()}

    def _status_mib(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
        raise RuntimeError(f"no {field}")


def _settled(op: Operator, quiet_s: float = 3.0) -> None:
    """Until the operator has had no render running or asked for during `quiet_s`."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    since = time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the operator still rendering after {SETTLE_TIMEOUT_S:.0f} s with no change made")
        time.sleep(0.2)
        if op.metric_sum("synfleet_operator_render_pending"):
            since = time.monotonic()


def _paced(rate: float, seconds: float, step) -> int:
    """Call step(n) `rate` times a second for `seconds`; how many calls were made."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
            continue
        step(n)
        n += 1
    return n


def _unrelated(api: Api, size: Size, n: int) -> None:
    """An update of an unprotected Service or its EndpointSlice that changes what
    a render could read: an external address comes or goes, an endpoint's
    readiness flips (a label change would not even reach the operator's cache)."""
    unprotected = size.services - size.policies
    i = size.policies + n // 2 % unprotected
    turn = n // 2 // unprotected          # how often this Service came round before
    ns, name = _service_namespace(i), _service_name(i)
    if n % 2 == 0:
        ips = [] if turn % 2 else [f"192.0.2.{i % 250 + 1}"]
        api.patch(f"/api/v1/namespaces/{ns}/services/{name}", {"spec": {"externalIPs": ips or None}})
    else:
        slice_ = _endpoint_slice(i, size.proxies + i % size.backends, ready=turn % 2 == 1)
        api.patch(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{slice_['metadata']['name']}",
                  {"endpoints": slice_["endpoints"]})


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _profiler(pid: int, path: Path, seconds: float) -> subprocess.Popen:
    """py-spy sampling the operator for `seconds`: every thread's stacks, idle
    ones too (a render waiting on the API server is where its time goes), as
    collapsed stacks (flamegraph.pl's input; one line per stack and count).
    Without pausing the operator for each sample: paused, its p50 was 4x longer."""
    if shutil.which("py-spy") is None:
        raise ValueError("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds) + 1),
                             "--threads", "--idle", "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(size: Size, progress=lambda what: None, profile: Path | None = None) -> dict:
    size.check()
    workdir = Path(tempfile.mkdtemp(prefix="synfleet-bench-operator-"))
    cluster = ControlPlane(workdir)
    stop = threading.Event()
    proc = None
    try:
        progress("starting kube-apiserver and etcd")
        cluster.start()
        api = Api(cluster)
        for ns in [NAMESPACE] + [f"bench-{k}" for k in range(APP_NAMESPACES)]:
            api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        api.post(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA}})
        cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE)
        t = time.monotonic()
        progress(f"writing {size.nodes:,} Nodes, {size.services:,} Services and EndpointSlices, "
                 f"{size.backends:,} agent pods, {size.policies:,} policies in {size.pools}+{size.pools} pools")
        _spread(api, lambda i: _add_node(api, i, size), range(size.nodes))
        _spread(api, lambda i: _add_service(api, i, size), range(size.services))
        _spread(api, lambda i: _add_agent_pod(api, i, size), range(size.proxies, size.proxies + size.backends))
        _pools(api, size)
        _spread(api, lambda i: _add_policy(api, i, size), range(size.policies))
        populate_s = time.monotonic() - t

        changes = Changes(size)
        rv = api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps")["metadata"]["resourceVersion"]
        watcher = threading.Thread(target=lambda: [changes.seen(cm) for cm in api.watch(
            f"/api/v1/namespaces/{NAMESPACE}/configmaps", rv, stop)], daemon=True)
        watcher.start()
        progress("starting the operator")
        proc = OperatorProcess(cluster, NAMESPACE, RELEASE, peering=RELEASE).start()
        op = Operator(proc)
        started = time.monotonic()
        deadline = started + SYNC_TIMEOUT_S
        while changes.policies_in_proxy_documents() < size.policies:
            if not proc.running():
                raise RuntimeError(f"the operator exited: {proc.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{changes.policies_in_proxy_documents()} of {size.policies} policies "
                                   f"rendered after {SYNC_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        initial_sync_s = time.monotonic() - started
        rss = {"synced": op.rss_mib()}
        progress(f"every policy rendered after {initial_sync_s:.1f} s; reporting the agents' rollouts")
        _rollouts(api, size)
        _settled(op)      # the renders those status changes cause (every policy's Nodes column), before counting
        rss["rolled_out"] = op.rss_mib()
        rss["rolled_out_parts"] = op.rss_parts_mib()

        progress(f"quiet phase: {size.unrelated_per_s:g} unrelated updates/s for {size.quiet_seconds:g} s")
        renders0 = op.metric_sum("synfleet_operator_renders_total")
        causes0 = op.render_requests()
        unrelated0 = op.metric_sum("synfleet_operator_unrelated_events_total")
        quiet = _paced(size.unrelated_per_s, size.quiet_seconds, lambda n: _unrelated(api, size, n))
        time.sleep(2)
        quiet_renders = op.metric_sum("synfleet_operator_renders_total") - renders0
        quiet_causes = {cause: n - causes0.get(cause, 0) for cause, n in op.render_requests().items()
                        if n != causes0.get(cause, 0)}
        unrelated_seen = op.metric_sum("synfleet_operator_unrelated_events_total") - unrelated0

        progress(f"load phase: {size.unrelated_per_s:g} unrelated updates/s and {size.changes_per_s:g} "
                 f"policy changes/s for {size.seconds:g} s")
        requests0 = op.api_requests()
        renders0 = op.metric_sum("synfleet_operator_renders_total")
        cpu0 = op.cpu_s()
        offset = quiet

        def change(n: int) -> None:
            i = n % size.policies
            mode = "monitor" if n // size.policies % 2 == 0 else "enforce"
            changes.sent(i, mode)
            api.patch(f"/apis/{contract.API_VERSION}/namespaces/{_service_namespace(i)}/synproxypolicies/"
                      f"{_policy_name(i)}", {"spec": {"mode": mode}})

        profiler = _profiler(proc.pid, profile, size.seconds) if profile else None
        background = threading.Thread(target=lambda: _paced(
            size.unrelated_per_s, size.seconds, lambda n: _unrelated(api, size, offset + n)), daemon=True)
        background.start()
        sent = _paced(size.changes_per_s, size.seconds, change)
        background.join()
        load_cpu_s = op.cpu_s() - cpu0
        if profiler is not None:
            profiler.wait(timeout=30)
        settle = time.monotonic() + SETTLE_TIMEOUT_S
        while changes.pending and time.monotonic() < settle:
            time.sleep(0.2)
        renders = op.metric_sum("synfleet_operator_renders_total") - renders0
        requests = {k: n - requests0.get(k, 0) for k, n in op.api_requests().items() if n != requests0.get(k, 0)}
        ms = [s * 1000 for s in changes.latencies]
        result = {
            "size": asdict(size), "populate_s": round(populate_s, 1), "initial_sync_s": round(initial_sync_s, 2),
            "policy_changes": sent, "policy_changes_seen": len(ms),
            "render_p50_ms": round(_percentile(ms, 0.50), 1), "render_p99_ms": round(_percentile(ms, 0.99), 1),
            "render_max_ms": round(max(ms, default=float("nan")), 1),
            "unrelated_updates_quiet": quiet, "unrelated_events_seen_quiet": int(unrelated_seen),
            "renders_from_unrelated_events": int(quiet_renders),
            "render_requests_quiet": quiet_causes,
            "renders_during_load": int(renders),
            "api_requests_per_policy_change": round(sum(requests.values()) / sent, 2) if sent else None,
            "api_requests_during_load": requests,
            "operator_cpu_s_during_load": round(load_cpu_s, 2),
            "operator_cpu_s_total": round(op.cpu_s(), 2),
            "operator_peak_rss_mib": round(op.peak_rss_mib(), 1),
            "operator_rss_mib": {**rss, "end": op.rss_mib(), "end_parts": op.rss_parts_mib()},
            "operator_errors": op.errors(),
            "operator_log_errors": [line for line in proc.log().splitlines()
                                    if " ERROR " in line or " WARNING synfleet" in line][-20:],
            "aims": AIMS,
        }
        result["met"] = {"render_p99_ms": result["render_p99_ms"] <= AIMS["render_p99_ms"],
                         "operator_peak_rss_mib": result["operator_peak_rss_mib"] <= AIMS["operator_peak_rss_mib"],
                         "renders_from_unrelated_events": result["renders_from_unrelated_events"] == 0}
        return result
    finally:
        stop.set()
        if proc is not None:
            proc.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
