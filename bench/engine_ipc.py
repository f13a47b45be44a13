"""Throughput of the checkpoint-engine IPC handoff into a reference engine process (``--ipc`` mode).

This process plays the agent: it holds the weights and streams them in buckets through one shared
buffer (a /dev/shm file on CPU, a CUDA IPC allocation on GPU) over ZMQ REQ/REP, triggered through
the engine's SGLang-style ``POST /update_weights_from_ipc``. The engine copies each bucket into its
own tensors, as SGLang's and vLLM's ``load_weights`` do; the first handoff makes it healthy, later
ones are updates. Each row is one full handoff.

    .venv/bin/python bench/engine_ipc.py --device cpu --size small                 # ~270 MB
    .venv/bin/python bench/engine_ipc.py --device cuda --gb 16 --bucket-mb 1024    # on a GPU machine

Prints a table and writes ``bench/results/engine_ipc_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-token"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", help="a test-model size (tiny, small), unless --gb is given")
    ap.add_argument("--gb", type=float, default=None, help="a Llama-shaped model of about this many GB instead")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch

    from seedfork_agent.engines import ipc
    from seedfork_agent.engines.testmodel import SIZES, make_weights

    if args.gb:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from engine_attach import llama_like

        config = llama_like(args.gb)
    else:
        config = SIZES[args.size]
    weights = {n: t.to(args.device) for n, t in make_weights(config).items()}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    work = Path(tempfile.mkdtemp(prefix="seedfork-ipc-bench-"))
    (work / "config.json").write_text(config.to_json())
    ip = "127.0.0.1"
    port = free_port(ip)
    log = (work / "engine.log").open("wb")
    cmd = [sys.executable, "-m", "seedfork_agent.engines.reference", "serve", "--ipc", "--config", str(work)]
    cmd += ["--host", ip, "--port", str(port), "--token", TOKEN, "--device", args.device]
    engine = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{ip}:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 503:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or engine.poll() is not None:
                raise RuntimeError(f"engine did not start; see {work / 'engine.log'}")
            time.sleep(0.2)
        for run in range(args.runs):
            t0 = time.perf_counter()
            sent = ipc.handoff_over_http(
                url, "sglang", weights, bucket_bytes=args.bucket_mb << 20, device=args.device, token=TOKEN
            )
            seconds = time.perf_counter() - t0
            healthy = httpx.get(f"{url}/health").status_code == 200
            rows.append(
                {"run": run, "seconds": seconds, "bytes": sent, "gbps": sent / seconds / 1e9, "healthy": healthy}
            )
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    where = f"{args.device} ({gpu})" if gpu else args.device
    print(f"IPC handoff, {where}: {nbytes / 1e9:.2f} GB, {len(weights)} tensors, bucket {args.bucket_mb} MiB")
    print(f"{'run':>4} {'seconds':>9} {'GB/s':>7} {'healthy':>8}")
    for r in rows:
        print(f"{r['run']:>4} {r['seconds']:>9.3f} {r['gbps']:>7.2f} {r['healthy']!s:>8}")
    p50 = statistics.median(r["seconds"] for r in rows)
    print(f"p50  {p50:>9.3f} {nbytes / p50 / 1e9:>7.2f}")
    result = {
        "device": args.device,
        "gpu": gpu,
        "config": dataclasses.asdict(config),
        "bytes": nbytes,
        "bucket_mb": args.bucket_mb,
        "runs": rows,
        "seconds_p50": p50,
        "gbps_p50": nbytes / p50 / 1e9,
        "all_healthy": all(r["healthy"] for r in rows),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"engine_ipc_{args.device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["all_healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
