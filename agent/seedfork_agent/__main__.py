"""``seedfork-agent``: serve weights from storage, pull them from a seed, or run in a pod.

    seedfork-agent serve --host IP --port P --weights DIR --fingerprint F      (token: $SEEDFORK_TOKEN)
    seedfork-agent pull  --host IP --port P --seed IP:PORT [--seed ...] --backend nccl|transfer_engine \
                         --group-port N --fingerprint F
    seedfork-agent manifest DIR --fingerprint F        (print the manifest with checksums)
    seedfork-agent run [-- <engine command>]           (in a pod: everything from the pod contract; with
                                                        engine sglang, the SGLang command to launch)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from seedfork_api.contract import ENV_TOKEN, ENV_TOKEN_PREVIOUS, PodEnv

from .agent import Agent, AgentConfig, load_hook
from .engine_cache import CacheKey, device_kind
from .engines.gate import EngineGate
from .server import default_device
from .store import Manifest, WeightStore

log = logging.getLogger("seedfork.agent")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="the pod IP to bind to (never 0.0.0.0)")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--fingerprint", required=True, help="identity fingerprint of the weights")
    p.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when present)")
    p.add_argument("--protocol", default="auto", help="TransferEngine transport: auto, tcp, rdma, nvlink_intra")
    p.add_argument("--no-te", action="store_true", help="do not serve over TransferEngine")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for any transfer or rendezvous")
    p.add_argument("--bandwidth-limit-mbps", type=int, default=None, help="cap on bytes served (NCCL/gloo)")
    p.add_argument("--max-clients", type=int, default=4, help="group creations this seed lets wait at once")
    p.add_argument("--engine-hook", default=os.environ.get("SEEDFORK_ENGINE_HOOK"), help="module:callable")
    p.add_argument(
        "--engine-ranks",
        type=int,
        default=0,
        help="an engine of this many ranks loads from the store itself (vLLM, --load-format seedfork): "
        "verified only once every rank proved its load",
    )
    p.add_argument("--engine-url", default=None, help="the engine's health URL: when its API is up (compiled)")
    p.add_argument("--engine-cache", default=None, help="the engine's compile-cache directory, shared with seeds")
    p.add_argument("--engine-name", default="vllm", help="engine kind, part of the engine cache's key")
    p.add_argument("--engine-version", default="", help="engine version, part of the engine cache's key")
    p.add_argument(
        "--port-range", default=None, type=_port_range,
        help="START-END: the set's transfer ports; TransferEngine and rendezvous listeners stay inside",
    )  # fmt: skip


def _port_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    if not sep or not start.isdigit() or not end.isdigit() or int(start) > int(end):
        raise argparse.ArgumentTypeError(f"want START-END, got {text!r}")
    return int(start), int(end)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seedfork-agent", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="load from storage, verify, serve")
    _common(serve)
    serve.add_argument("--weights", required=True, help="directory of *.safetensors files")
    pull = sub.add_parser("pull", help="pull from a seed, verify, serve")
    _common(pull)
    pull.add_argument("--seed", action="append", required=True, help="IP:PORT of a seed's agent; tried in order")
    pull.add_argument("--backend", default="transfer_engine", choices=["transfer_engine", "nccl", "gloo"])
    pull.add_argument("--group-port", type=int, action="append", default=[], help="NCCL rendezvous port on the seed")
    pull.add_argument("--cohort-id")
    pull.add_argument("--cohort-rank", type=int)
    pull.add_argument("--cohort-size", type=int)
    pull.add_argument("--client-id", default="", help="id in the SGLang group name (default: --host)")
    pull.add_argument("--expect-manifest", help="manifest JSON to use when a seed publishes none (stock SGLang)")
    pull.add_argument("--exit-after-verify", action="store_true", help="exit 0 once verified instead of serving")
    man = sub.add_parser("manifest", help="print the manifest (with checksums) of a safetensors directory")
    man.add_argument("weights")
    man.add_argument("--fingerprint", required=True)
    run = sub.add_parser(
        "run", help="in a pod: follow the pod contract (env + annotations); engine sglang: run -- <sglang command>"
    )
    run.add_argument("--device", default=None)
    run.add_argument("--engine-hook", default=os.environ.get("SEEDFORK_ENGINE_HOOK"), help="module:callable")
    run.add_argument("--engine-log-dir", default=None, help="engine sglang: where SGLang's output goes (default: tmp)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    args.engine_argv = argv[split + 1 :]
    if args.engine_argv and args.cmd != "run":
        ap.error("only 'run' takes an engine command after --")
    return args


def _token() -> str:
    token = os.environ.get(ENV_TOKEN, "")
    if not token:
        raise SystemExit(f"set the bearer token in ${ENV_TOKEN}")
    return token


def _agent(args: argparse.Namespace) -> Agent:
    config = AgentConfig(
        host=args.host,
        port=args.port,
        token=_token(),
        token_previous=os.environ.get(ENV_TOKEN_PREVIOUS) or None,
        fingerprint=args.fingerprint,
        device=args.device or default_device(),
        protocol=args.protocol,
        serve_te=not args.no_te,
        timeout_s=args.timeout,
        bandwidth_limit_mbps=args.bandwidth_limit_mbps,
        client_id=getattr(args, "client_id", "") or "",
        **({"port_range": args.port_range} if args.port_range else {}),
        max_pending_groups=args.max_clients,
        engine_health_url=args.engine_url,
        engine_cache_dir=args.engine_cache,
        engine_cache_key=_cache_key(args),
    )
    gate = EngineGate(args.engine_ranks) if args.engine_ranks else None
    return Agent(config, load_hook(args.engine_hook), gate)


def _cache_key(args: argparse.Namespace) -> CacheKey | None:
    if not args.engine_cache:
        return None
    device = args.device or default_device()
    return CacheKey(args.fingerprint, args.engine_name, args.engine_version, device_kind(device))


async def _serve_forever(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def cmd_serve(args: argparse.Namespace) -> int:
    agent = _agent(args)
    await agent.start()
    try:
        if not await agent.load_storage(args.weights):
            print(json.dumps({"state": "failed", "error": agent.attempt.report.error}), flush=True)
            return 1
        _announce(agent)
        await _serve_forever(agent)
        return 0
    finally:
        await agent.stop()


async def cmd_pull(args: argparse.Namespace) -> int:
    agent = _agent(args)
    expected = _read_manifest(args.expect_manifest) if args.expect_manifest else None
    await agent.start()
    try:
        for attempt, seed in enumerate(args.seed, start=1):
            ip, _, port = seed.rpartition(":")
            req = agent.request(
                ip,
                int(port),
                args.backend,
                group_ports=args.group_port,
                cohort_id=args.cohort_id,
                cohort_rank=args.cohort_rank,
                cohort_size=args.cohort_size,
                expected=expected,
            )
            if await agent.pull_seed(req, attempt):
                break
            error = agent.attempt.report.error
            print(json.dumps({"state": "failed", "attempt": attempt, "seed": seed, "error": error}), flush=True)
        else:
            return 1
        _announce(agent)
        if not args.exit_after_verify:
            await _serve_forever(agent)
        return 0
    finally:
        await agent.stop()


def _read_manifest(path: str) -> Manifest:
    return Manifest.from_dict(json.loads(Path(path).read_text()))


def _announce(agent: Agent) -> None:
    """One JSON line once verified: the attempt as the pod report has it, and how this agent serves it."""
    r, t = agent.attempt.report, agent.attempt.timing
    print(
        json.dumps(
            {
                "state": r.state,
                "attempt": r.attempt,
                "source": r.source,
                "seed": agent.attempt.seed,
                "bytes": r.bytes_total,
                "seconds": round((t.verified or 0) - (t.transfer_start or 0), 4),
                "digest": r.digest,
                "te": agent.te.session_id if agent.te else None,
            }
        ),
        flush=True,
    )


def cmd_manifest(args: argparse.Namespace) -> int:
    with WeightStore.from_safetensors(args.weights, args.fingerprint) as store:
        print(json.dumps(store.manifest.to_dict(), indent=1))
    return 0


async def cmd_run(args: argparse.Namespace) -> int:
    env = PodEnv.from_environ()
    if env.engine == "sglang":
        from .engines.sglang_pod import SGLangPod

        if not args.engine_argv:
            raise SystemExit(
                "engine sglang: give the SGLang command after --, e.g. run -- python3 -m sglang.launch_server ..."
            )
        pod = SGLangPod(env, args.engine_argv, args.engine_log_dir)
    elif args.engine_argv:
        raise SystemExit(f"engine {env.engine}: the agent moves the bytes and launches no engine command; drop -- ...")
    else:
        from .podrun import PodAgent

        pod = PodAgent(env, args.device or default_device(), load_hook(args.engine_hook))
    task = asyncio.create_task(pod.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("SEEDFORK_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    args = parse(argv)
    if args.cmd == "manifest":
        code = cmd_manifest(args)
    else:
        handler = {"serve": cmd_serve, "pull": cmd_pull, "run": cmd_run}[args.cmd]
        code = asyncio.run(_then_exit(handler(args)))
    sys.exit(code)


async def _then_exit(work) -> int:
    code = await work
    # Cleanup ran inside ``work``. A worker thread may still sit in a transfer on a dead peer's socket (a
    # gloo/NCCL broadcast or receive: nothing cancels it, only its timeout, minutes away, ends it), and
    # asyncio.run would wait for it: leave without joining the worker threads.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
