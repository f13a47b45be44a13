"""What it would cost to register a seed's memory with TransferEngine only while a transfer needs it.

A seed now registers its whole store once, when it starts serving, and keeps it registered. Registering it
per transfer instead would add one ``register_memory`` and one ``unregister_memory`` of the whole store to
every pull. This measures both, side by side with the pull itself, in one run: a seed agent process serves a
Llama-shaped weight set; this process pulls it with the agent's real puller over TransferEngine (which
registers its own receive buffer of the same size and kind each time: the ``register`` phase), then
unregisters that buffer and registers it again, timed.

    python bench/te_register.py [--mb 272] [--reps 5] [--device cpu|cuda] [--out bench/results/te_register_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "agent"), str(REPO / "api"), str(REPO / "bench")]

import httpx  # noqa: E402
import torch  # noqa: E402
from agent_cpu import make_weights  # noqa: E402

TOKEN = "bench-token"
PORT = 18080
NET = f"127.{random.randint(20, 230)}.11"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"seed exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("seed not ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=272)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    protocol = "nvlink_intra" if cuda else "tcp"
    out = Path(args.out or REPO / "bench" / "results" / f"te_register_{'cuda' if cuda else 'cpu'}.json")

    from seedfork_agent.puller import PullRequest, pull
    from seedfork_agent.te import engine

    seed_ip, client_ip = f"{NET}.2", f"{NET}.3"
    seed_dev, client_dev = ("cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if cuda else ("cpu",) * 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        payload = make_weights(Path(tmp), args.mb)
        env = {**os.environ, "SEEDFORK_TOKEN": TOKEN, "PYTHONPATH": f"{REPO / 'agent'}:{REPO / 'api'}"}
        seed = subprocess.Popen(
            [sys.executable, "-m", "seedfork_agent", "serve", "--host", seed_ip, "--port", str(PORT),
             "--weights", tmp, "--fingerprint", "bench", "--device", seed_dev, "--protocol", protocol,
             "--timeout", "300"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_ready(f"http://{seed_ip}:{PORT}", seed)
            te = engine(client_ip, protocol, 300, (28098, 28099))
            for i in range(args.reps + 1):  # the first pull warms up (connections, page faults): not counted
                req = PullRequest(
                    seed_ip=seed_ip, seed_port=PORT, token=TOKEN, backend="transfer_engine", fingerprint="bench",
                    client_id=f"bench{i}", timeout_s=300, device=client_dev,
                )  # fmt: skip
                stats: dict = {}
                t = time.perf_counter()
                store = pull(req, lambda: te, stats=stats)
                total = time.perf_counter() - t
                ptr, nbytes = store.buffer.data_ptr(), store.nbytes
                t = time.perf_counter()
                te.unregister(ptr)
                unregister = time.perf_counter() - t
                t = time.perf_counter()
                te.register(ptr, nbytes)
                register = time.perf_counter() - t
                te.unregister(ptr)
                store.close()
                if i:
                    rows.append(
                        {"pull_s": total, "pull_register_s": stats["register_s"], "transfer_s": stats["transfer_s"],
                         "register_s": register, "unregister_s": unregister}
                    )  # fmt: skip
        finally:
            seed.terminate()
            seed.wait(30)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    extra = med["register_s"] + med["unregister_s"]
    result = {
        "device": args.device, "protocol": protocol, "payload_bytes": payload, "reps": args.reps,
        "cpus": os.cpu_count(), "median": med, "per_transfer_registration_s": extra,
        "ratio_to_pull": extra / med["pull_s"], "ratio_to_transfer": extra / med["transfer_s"], "rows": rows,
    }  # fmt: skip
    print(f"TransferEngine registration per transfer ({protocol}, {payload / 1e6:.0f} MB, median of {args.reps})")
    print(f"{'what':<34}{'ms':>10}")
    for label, key in [("pull (manifest .. verified)", "pull_s"), ("  of which transfer", "transfer_s"),
                       ("register whole store", "register_s"), ("unregister whole store", "unregister_s")]:  # fmt: skip
        print(f"{label:<34}{med[key] * 1000:>10.2f}")
    print(f"{'register + unregister / pull':<34}{result['ratio_to_pull']:>10.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
