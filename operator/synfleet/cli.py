"""The `synfleet` command."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

PRODUCT_COMMANDS = ("agent", "operator")
# Commands other distributions add (the lab: demo, check, bench): each entry
# point is called with the subparsers and adds its own.
COMMANDS_GROUP = "synfleet.commands"


def _listen_address(value: str) -> str:
    host = value.rpartition(":")[0].strip("[]")
    if value and host in ("", "0.0.0.0", "::"):
        raise argparse.ArgumentTypeError(
            f"{value}: give one address, not all of them (on a proxy node they include the "
            f"addresses it protects); e.g. the node's internal address or 127.0.0.1")
    return value


def _agent(args: argparse.Namespace) -> int:
    from synfleet.agent import logs
    from synfleet.agent.agent import Agent, AgentOptions, uninstall
    from synfleet.config.schema import Role

    logs.setup(args.log_level)
    instance = args.instance or args.role
    if args.action == "uninstall":
        if not instance:
            print("synfleet agent uninstall: give --instance (or --role, its default)", file=sys.stderr)
            return 2
        detached = uninstall(instance, args.pin_root)
        if detached is None:
            print(f"synfleet agent: nothing installed at {args.pin_root}/{instance}")
            return 0
        print(f"synfleet agent: removed {args.pin_root}/{instance}; detached from "
              f"{', '.join(detached) or 'no interface'}")
        return 0
    if not args.role or bool(args.config) == args.kubernetes:
        print("synfleet agent: give --role and either --config FILE or --kubernetes", file=sys.stderr)
        return 2
    role = Role(args.role)
    kube = None
    if args.kubernetes:
        from synfleet.agent.sources import KubeSourceOptions

        if not args.configmap or (role is Role.PROXY) != bool(args.secret) or not args.node_addresses:
            print("synfleet agent --kubernetes: give --configmap, --node-addresses (or "
                  "SYNFLEET_NODE_ADDRESSES), and for a proxy (only) --secret", file=sys.stderr)
            return 2
        kube = KubeSourceOptions(namespace=args.namespace, configmap=args.configmap, secret=args.secret,
                                 node_addresses=args.node_addresses, kubeconfig=args.kubeconfig)
    report = None
    if args.kubernetes and args.pool_uid and args.node_name:
        from synfleet.agent.report import ReportOptions

        report = ReportOptions(namespace=args.namespace, pool=args.pool or instance, pool_uid=args.pool_uid,
                               node_name=args.node_name)
    agent = Agent(AgentOptions(role=role, config_path=args.config, kube=kube, instance=instance,
                               pin_root=args.pin_root, listen=args.listen or None,
                               objects_dir=args.objects, report=report))
    agent.start()
    agent.run()
    return 0


def _operator(args: argparse.Namespace) -> int:
    from synfleet.operator.main import OperatorOptions, run
    from synfleet.resources.agents import OperatorSettings

    if not args.agent_image:
        print("synfleet operator: give --agent-image (or SYNFLEET_AGENT_IMAGE)", file=sys.stderr)
        return 2
    run(OperatorOptions(
        settings=OperatorSettings(namespace=args.namespace, agent_image=args.agent_image,
                                  encap_port=args.encap_port, teardown_timeout_s=args.teardown_timeout),
        peering=args.peering, metrics_port=args.metrics_port or None, liveness=args.liveness or None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synfleet", description=__doc__,
        epilog="`demo`, `check` and `bench` come with the lab (pip install ./lab; scripts/setup.sh does it)")
    sub = parser.add_subparsers(dest="command", required=True)
    agent = sub.add_parser("agent", help="run the node agent (or `agent uninstall`)",
                           description="Run the node agent: load, pin and configure this node's "
                                       "data plane from a DataplaneConfig file. `synfleet agent "
                                       "uninstall --instance NAME` detaches and unpins it.")
    agent.add_argument("action", nargs="?", choices=["run", "uninstall"], default="run")
    agent.add_argument("--role", choices=["proxy", "backend"])
    agent.add_argument("--config", help="DataplaneConfig YAML file; re-read on change and on SIGHUP")
    agent.add_argument("--kubernetes", action="store_true",
                       help="read the configuration from the pool's ConfigMap (and, for proxies, "
                            "the salt Secret) through the Kubernetes API instead of a file")
    agent.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "synfleet-system"),
                       help="namespace of the ConfigMap and Secret (default: $POD_NAMESPACE)")
    agent.add_argument("--configmap", help="ConfigMap holding the DataplaneConfig (--kubernetes)")
    agent.add_argument("--secret", help="Secret holding the pool's salts (--kubernetes, proxies)")
    agent.add_argument("--node-addresses", default=os.environ.get("SYNFLEET_NODE_ADDRESSES"),
                       help="this node's addresses, comma-separated (default: $SYNFLEET_NODE_ADDRESSES, "
                            "which the DaemonSet fills from status.hostIPs)")
    agent.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, or $KUBECONFIG)")
    agent.add_argument("--pool", help="--kubernetes: the pool this agent serves (default: --instance)")
    agent.add_argument("--pool-uid", help="--kubernetes: the pool's uid; with --node-name, the agent keeps "
                                          "its node's NodeAgent object (owned by the pool)")
    agent.add_argument("--node-name", default=os.environ.get("SYNFLEET_NODE_NAME"),
                       help="this node's name (default: $SYNFLEET_NODE_NAME, from spec.nodeName)")
    agent.add_argument("--instance", help="pin directory name under --pin-root (default: the role)")
    agent.add_argument("--pin-root", default="/sys/fs/bpf/synfleet", help="bpffs directory for pins")
    agent.add_argument("--listen", default="127.0.0.1:9478", type=_listen_address,
                       help="address:port for /metrics, /healthz, /readyz, [v6]:port for IPv6 "
                            "(default 127.0.0.1:9478; the pool's DaemonSet gives the node's address; "
                            "never all addresses: on a proxy they include the protected ones; '' disables)")
    agent.add_argument("--objects", help="directory with proxy.bpf.o and backend.bpf.o "
                                         "(default: the ones installed with synfleet)")
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    agent.set_defaults(func=_agent)
    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf, cluster-wide)",
                        description="Reconcile ProxyPools and BackendPools into agent DaemonSets, "
                                    "publish the salts, render SynProxyPolicies into the agents' "
                                    "ConfigMaps. Uses the in-cluster ServiceAccount or $KUBECONFIG.")
    op.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "synfleet-system"),
                    help="namespace of the agents, their ConfigMaps and salt Secrets "
                         "(default: $POD_NAMESPACE or synfleet-system)")
    op.add_argument("--agent-image", default=os.environ.get("SYNFLEET_AGENT_IMAGE"),
                    help="agent image for pools that name none (default: $SYNFLEET_AGENT_IMAGE)")
    op.add_argument("--encap-port", type=int, default=6080, help="UDP port of the encapsulation")
    op.add_argument("--teardown-timeout", type=float, default=120.0,
                    help="seconds a deleted pool or policy waits for its nodes to confirm before it goes "
                         "anyway, with a Warning naming them")
    op.add_argument("--peering", default="synfleet", help="ClusterKopfPeering name (leader election)")
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    op.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint")
    op.set_defaults(func=_operator)
    given = sys.argv[1:] if argv is None else argv
    if not given or given[0] not in PRODUCT_COMMANDS:
        # The agent and the operator never load another distribution's code.
        for ep in entry_points(group=COMMANDS_GROUP):
            ep.load()(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
