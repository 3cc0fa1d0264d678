"""The per-pool agent workload: DaemonSet, ServiceAccount and the RBAC that lets
a pool's agents read their own ConfigMap and (proxies only) their own salt
Secret, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from synfleet import contract
from synfleet.config.schema import Role
from synfleet.contract import API_VERSION
from synfleet.resources import names
from synfleet.resources.model import MetricsAddress, Pool

BPFFS = "/sys/fs/bpf"
BTF = "/sys/kernel/btf"
DEFAULT_RESOURCES = {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
# Load and attach BPF programs (BPF, NET_ADMIN); verifier features for
# non-root-equivalent loaders, e.g. pointer arithmetic on packet data (PERFMON).
# Nothing else: no SYS_ADMIN, no privileged container.
AGENT_CAPABILITIES = ["BPF", "NET_ADMIN", "PERFMON"]


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str                   # where the agents, their ConfigMaps and Secrets live
    agent_image: str                 # used when a pool names no image
    encap_port: int = 6080
    # How long deleting a pool or a policy waits for the nodes to confirm
    # before it goes anyway (with a Warning naming the nodes that did not).
    teardown_timeout_s: float = 120.0


def owner_reference(pool: Pool) -> dict:
    return {"apiVersion": API_VERSION, "kind": pool.kind, "name": pool.name, "uid": pool.uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(pool: Pool, settings: OperatorSettings, name: str | None = None) -> dict:
    return {"name": name or names.agent_name(pool.role, pool.name), "namespace": settings.namespace,
            "labels": names.labels(pool.role, pool.name), "ownerReferences": [owner_reference(pool)]}


def agent_args(pool: Pool, settings: OperatorSettings) -> list[str]:
    args = ["agent", "--role", pool.role.value, "--kubernetes", "--instance", pool.name, "--pool", pool.name,
            "--pool-uid", pool.uid,
            "--namespace", settings.namespace,
            "--configmap", names.agent_name(pool.role, pool.name),
            "--listen", f"{_metrics_host(pool)}:{pool.spec.metrics_port}"]
    if pool.role is Role.PROXY:
        args += ["--secret", names.salts_secret_name(pool.name)]
    return args


def _metrics_host(pool: Pool) -> str:
    # Never all addresses: on a proxy node they include the ones it protects.
    # $(NODE_IP) is the kubelet's expansion of the env var (an IPv6 one works
    # unbracketed: the agent splits at the last colon).
    return "$(SYNFLEET_NODE_IP)" if pool.spec.metrics_address is MetricsAddress.NODE_IP else "127.0.0.1"


def _http_probe(pool: Pool, path: str, period_s: int) -> dict:
    # The kubelet probes a host-network pod at the node's IP unless told otherwise.
    host = {} if pool.spec.metrics_address is MetricsAddress.NODE_IP else {"host": "127.0.0.1"}
    return {"httpGet": {"path": path, "port": pool.spec.metrics_port, **host}, "periodSeconds": period_s}


def not_on_proxy_nodes(proxy_selectors: list[dict[str, str]]) -> dict:
    """Node affinity of a backend pool's agents: no node any proxy pool
    selects. A node is a proxy or a backend, never both (one pool's agent per
    interface and metrics port; a proxy forwards to other nodes), so where two
    pools of different roles select a node, the proxy keeps it and the backend
    pool's status names it. NOT(a=1 AND b=2) is (a NotIn [1]) OR (b NotIn [2]);
    nodeSelectorTerms are ORed and their expressions ANDed, so the pools' negations
    multiply out into terms."""
    terms: list[list[dict]] = [[]]
    for selector in proxy_selectors:
        if not selector:
            # That proxy pool selects every node: no backend can run. Every node
            # has a hostname label, so this term matches none.
            return _affinity([[{"key": "kubernetes.io/hostname", "operator": "DoesNotExist"}]])
        negated = [{"key": k, "operator": "NotIn", "values": [v]} for k, v in sorted(selector.items())]
        terms = [term + [expr] for term in terms for expr in negated]
    return _affinity(terms)


def _affinity(terms: list[list[dict]]) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": t} for t in terms]}}}


def daemonset(pool: Pool, settings: OperatorSettings, proxy_selectors: list[dict[str, str]] = ()) -> dict:
    """`proxy_selectors`: the nodeSelectors of every proxy pool (a backend
    pool's agents keep off those nodes)."""
    spec = pool.spec
    port = spec.metrics_port
    container = {
        "name": "agent",
        "image": spec.image or settings.agent_image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": agent_args(pool, settings),
        "env": [
            # The node's own addresses become the encapsulation source (proxies)
            # and what the operator lists as allowed proxy sources: both read
            # the node's InternalIPs.
            {"name": "SYNFLEET_NODE_ADDRESSES", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIPs"}}},
            {"name": "SYNFLEET_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SYNFLEET_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        ],
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": _http_probe(pool, "/readyz", period_s=5),
        "livenessProbe": {**_http_probe(pool, "/healthz", period_s=10), "failureThreshold": 3},
        "resources": spec.resources or DEFAULT_RESOURCES,
        "securityContext": {
            "privileged": False,
            # Root with three capabilities, and no way to gain more (setuid files, file capabilities).
            "allowPrivilegeEscalation": False,
            "runAsUser": 0,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": AGENT_CAPABILITIES},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "bpffs", "mountPath": BPFFS, "mountPropagation": "HostToContainer"},
            {"name": "btf", "mountPath": BTF, "readOnly": True},
            # The root filesystem is read-only; the Kubernetes client keeps its
            # discovery cache in the temporary directory (no usable one: it fails to start).
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec = {
        "serviceAccountName": names.agent_name(pool.role, pool.name),
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": spec.priority_class_name,
        # SIGTERM leaves the data plane running; there is nothing to drain.
        "terminationGracePeriodSeconds": 10,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations],
        **({"affinity": not_on_proxy_nodes(list(proxy_selectors))}
           if pool.role is Role.BACKEND and proxy_selectors else {}),
        "containers": [container],
        "volumes": [
            {"name": "bpffs", "hostPath": {"path": BPFFS, "type": "Directory"}},
            {"name": "btf", "hostPath": {"path": BTF, "type": "Directory"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        ],
    }
    selector = names.selector_labels(pool.role, pool.name)
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(pool, settings),
        "spec": {
            "selector": {"matchLabels": selector},
            # One node at a time: a restarting agent keeps its node's data plane
            # (pinned programs and maps), so a rollout drops no connection.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": names.labels(pool.role, pool.name)}, "spec": pod_spec},
        },
    }


def service_account(pool: Pool, settings: OperatorSettings) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(pool, settings),
            "automountServiceAccountToken": True}


def role(pool: Pool, settings: OperatorSettings) -> dict:
    """Read access to exactly this pool's ConfigMap, and for proxies its salt
    Secret: a backend's agent can never read a salt."""
    rules = [{"apiGroups": [""], "resources": ["configmaps"],
              "resourceNames": [names.agent_name(pool.role, pool.name)], "verbs": ["get", "list", "watch"]}]
    if pool.role is Role.PROXY:
        rules.append({"apiGroups": [""], "resources": ["secrets"],
                      "resourceNames": [names.salts_secret_name(pool.name)], "verbs": ["get", "list", "watch"]})
    # Its own node's report (create cannot be limited by name: the chart's
    # admission policy holds each agent to its node and pool).
    rules.append({"apiGroups": [contract.GROUP], "resources": ["nodeagents", "nodeagents/status"],
                  "verbs": ["get", "create", "patch"]})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(pool, settings), "rules": rules}


def role_binding(pool: Pool, settings: OperatorSettings) -> dict:
    name = names.agent_name(pool.role, pool.name)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _meta(pool, settings),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": settings.namespace}]}


def agent_objects(pool: Pool, settings: OperatorSettings, proxy_selectors: list[dict[str, str]] = ()) -> list[dict]:
    """Everything a pool needs besides its ConfigMap and salts, in apply order."""
    return [service_account(pool, settings), role(pool, settings), role_binding(pool, settings),
            daemonset(pool, settings, proxy_selectors)]
