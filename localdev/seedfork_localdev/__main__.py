"""``seedfork-localdev``: build the control-plane binaries, or run a local control plane by hand."""

from __future__ import annotations

import argparse
import signal
import threading

from . import binaries
from .controlplane import ControlPlane


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedfork-localdev")
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build and cache kube-apiserver, etcd (and optionally helm, kubeconform)")
    build.add_argument("tools", nargs="*", default=["kube-apiserver", "etcd"], choices=sorted(binaries.TOOLS))
    sub.add_parser("controlplane", help="run etcd + kube-apiserver on loopback until interrupted")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        return binaries.main(args.tools)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ControlPlane() as cp:
        print(f"kube-apiserver {cp.version()} at {cp.url}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
