"""``seedfork-operator``: run the operator as a process.

    seedfork-operator --namespace team-a [--namespace team-b] [--metrics-port 8080]
    seedfork-operator --all-namespaces --peering seedfork --priority $RANDOM   # HA: highest priority is active

Kubernetes access: in-cluster service account, else $KUBECONFIG / ~/.kube/config.
Environment: SEEDFORK_AGENT_IMAGE (agent sidecar image), SEEDFORK_RECONCILE_INTERVAL (s),
SEEDFORK_METRICS_PORT, SEEDFORK_TRANSFER_DEFAULTS (JSON); flags override them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

import kopf

from .config import ConfigError, OperatorConfig, parse_transfer_defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seedfork-operator", description=__doc__.split("\n")[0])
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", help="namespace to serve (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: off)")
    p.add_argument("--agent-image", default=None, help="image of the injected agent sidecar")
    p.add_argument("--interval", type=float, default=None, help="seconds between full passes per set")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="no peering (one operator replica)")
    peering.add_argument("--peering", default=None, help="kopf peering object name for HA (several replicas)")
    p.add_argument("--priority", type=int, default=0, help="peering priority; the highest is active")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument(
        "--transfer-defaults",
        default=None,
        help='the cluster\'s transfer policy for fields a set leaves unset, JSON, e.g. \'{"backend": "nccl"}\'',
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> OperatorConfig:
    config = OperatorConfig.from_env()
    if args.transfer_defaults is not None:
        config = replace(config, transfer_defaults=parse_transfer_defaults(args.transfer_defaults))
    if args.metrics_port is not None:
        config = replace(config, metrics_port=args.metrics_port)
    if args.agent_image:
        config = replace(config, agent_image=args.agent_image)
    if args.interval:
        config = replace(config, interval=args.interval)
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from(args)
    except ConfigError as e:
        print(f"seedfork-operator: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from . import handlers  # noqa: F401  (registers the kopf handlers)

    kopf.run(
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
