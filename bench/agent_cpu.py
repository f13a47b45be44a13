"""CPU benchmark of the agent's data plane on loopback (CI-scale numbers).

A seed agent process (``seedfork-agent serve``) holds a Llama-shaped weight set in
shared memory; this process pulls it with the agent's puller over gloo (R-Fork
group protocol) and over TransferEngine TCP, and compares each with the raw
path of the same transport: one gloo broadcast of one buffer of the same size,
and one TransferEngine read of the seed's whole buffer. Also the CPU checksum rate.

    python bench/agent_cpu.py [--mb 128] [--reps 2] [--out bench/results/agent_cpu_loopback.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "agent"), str(REPO / "api")]

import httpx  # noqa: E402
import torch  # noqa: E402

GB = 1e9
TOKEN = "bench-token"
PORT = 18080
NET = f"127.{random.randint(20, 230)}.9"


def make_weights(directory: Path, mb: int) -> int:
    """Llama-layout tensors (bf16) scaled to about ``mb`` megabytes, in two safetensors files."""
    from safetensors.torch import save_file

    hidden, layers = 512, 1
    while True:
        inter, vocab = hidden * 7 // 2, 8000
        per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
        total = per_layer * layers + 2 * vocab * hidden * 2
        if total >= mb * 1e6 or layers > 64:
            break
        layers += 1
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden, hidden)),
            ("self_attn.v_proj.weight", (hidden, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)),
            ("input_layernorm.weight", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)),
        ]:
            tensors[p + name] = torch.randn(*shape, generator=g).bfloat16()
    tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[: len(names) // 2]}, str(directory / "a.safetensors"))
    save_file({n: tensors[n] for n in names[len(names) // 2 :]}, str(directory / "b.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def raw_gloo_sender(ip: str, port: int, nbytes: int, reps: int) -> None:
    from seedfork_agent import groups

    buf = torch.ones(nbytes, dtype=torch.uint8)
    pg = groups.init_group("gloo", ip, port, 2, 0, f"raw_{port}", 120)
    for _ in range(reps):
        torch.distributed.broadcast(buf, src=0, group=pg)
    groups.destroy_group(pg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "agent_cpu_loopback.json"))
    args = ap.parse_args()

    from seedfork_agent.checksum import checksum
    from seedfork_agent.puller import PullRequest, pull
    from seedfork_agent.te import engine

    seed_ip, client_ip = f"{NET}.2", f"{NET}.3"
    r: dict = {"cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        payload = make_weights(Path(tmp), args.mb)
        env = {**os.environ, "SEEDFORK_TOKEN": TOKEN, "PYTHONPATH": f"{REPO / 'agent'}:{REPO / 'api'}"}
        seed = subprocess.Popen(
            [sys.executable, "-m", "seedfork_agent", "serve", "--host", seed_ip, "--port", str(PORT),
             "--weights", tmp, "--fingerprint", "bench", "--device", "cpu", "--protocol", "tcp", "--timeout", "300"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://{seed_ip}:{PORT}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            te = engine(client_ip, "tcp", 300)
            port = 28000 + random.randint(0, 80)  # the seed's rendezvous ports: the default range's lower part

            # Raw TransferEngine: one read of the seed's whole buffer.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            info = httpx.get(f"{url}/remote_instance_transfer_engine_info?rank=0", headers=auth, timeout=10).json()
            session, weights = info["remote_instance_transfer_engine_info"]
            base = min(v[0] for v in weights.values())
            span = max(v[0] + v[1] * v[2] for v in weights.values()) - base
            dst = torch.ones(span, dtype=torch.uint8)
            te.register(dst.data_ptr(), span)
            times = []
            for _ in range(args.reps + 1):
                t = time.perf_counter()
                te.read(session, [dst.data_ptr()], [base], [span])
                times.append(time.perf_counter() - t)
            te.unregister(dst.data_ptr())
            r["raw_te_tcp_GBps"] = span / statistics.median(times[1:]) / GB

            # Raw gloo: one broadcast of one buffer of the same size.
            from seedfork_agent import groups

            times = []
            sender = mp.get_context("spawn").Process(target=raw_gloo_sender, args=(seed_ip, port, span, args.reps + 1))
            sender.start()
            pg = groups.init_group("gloo", seed_ip, port, 2, 1, f"raw_{port}", 120)
            for _ in range(args.reps + 1):
                t = time.perf_counter()
                torch.distributed.broadcast(dst, src=0, group=pg)
                times.append(time.perf_counter() - t)
            groups.destroy_group(pg)
            sender.join(60)
            r["raw_gloo_GBps"] = span / statistics.median(times[1:]) / GB
            del dst

            # The agent's full pulls.
            for backend in ("gloo", "transfer_engine"):
                rows = []
                for i in range(args.reps + 1):
                    port += 1
                    req = PullRequest(
                        seed_ip=seed_ip, seed_port=PORT, token=TOKEN, backend=backend, fingerprint="bench",
                        group_ports=[port], client_id=f"bench{i}", timeout_s=300, device="cpu",
                    )  # fmt: skip
                    stats: dict = {}
                    t = time.perf_counter()
                    store = pull(req, lambda: te, stats=stats)
                    stats["total_s"] = time.perf_counter() - t
                    te.unregister(store.buffer.data_ptr())
                    store.close()
                    if i:
                        rows.append(stats)
                for key in ("manifest_s", "alloc_s", "transfer_s", "verify_s", "total_s"):
                    r[f"{backend}_{key}"] = statistics.median(x[key] for x in rows)
                r[f"{backend}_data_GBps"] = (
                    payload / statistics.median(x["data_end"] - x["data_start"] for x in rows) / GB
                )
                r[f"{backend}_pull_GBps"] = payload / r[f"{backend}_total_s"] / GB
                raw = r["raw_gloo_GBps"] if backend == "gloo" else r["raw_te_tcp_GBps"]
                r[f"{backend}_pull_vs_raw_ratio"] = r[f"{backend}_pull_GBps"] / raw
                r[f"{backend}_data_vs_raw_ratio"] = r[f"{backend}_data_GBps"] / raw
        finally:
            seed.terminate()
            seed.wait(30)
        r["payload_bytes"] = payload
        data = torch.randint(0, 256, (payload,), dtype=torch.uint8)
        checksum(data)
        t = time.perf_counter()
        checksum(data)
        r["checksum_cpu_GBps"] = payload / (time.perf_counter() - t) / GB
    Path(args.out).write_text(json.dumps(r, indent=1, sort_keys=True))
    print(f"{'metric':36s} value")
    for k in sorted(r):
        v = r[k]
        print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")


if __name__ == "__main__":
    main()
