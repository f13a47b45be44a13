"""GPU benchmark of the agent's data plane: two GPUs of one host joined by NVLink.

One run measures, per weight set (Llama-8B-shaped 16 GB, Qwen-32B-shaped 65 GB, bf16):
  - the raw link: copy-engine peer copy of the seed's whole buffer (mapped over CUDA IPC through
    the store's attach info) and one NCCL broadcast of that whole buffer;
  - the agent's full pull (manifest -> allocate -> [register] -> transfer -> verify every checksum)
    over NCCL (R-Fork group protocol, per-tensor broadcast) and over TransferEngine nvlink_intra,
    with the phase breakdown;
  - the seed's bf16 8192^3 matmul throughput while idle and during each transfer phase;
  - TransferEngine registration time of the seed's store and the device checksum rate.
Writes JSON (ratios agent/raw-link under keys containing "ratio") and prints a table.

    python bench/agent_gpu.py --out bench/results/agent_gpu_h200x2.json [--models llama8b,qwen32b]
Needs 2 GPUs, torch, aiohttp, httpx, prometheus-client and mooncake-transfer-engine (CUDA wheel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "agent"), str(REPO / "api")]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from seedfork_agent.engines.testmodel import tensor_specs  # noqa: E402

GB = 1e9
TOKEN = "bench-token"
SEED_HOST, CLIENT_HOST, AGENT_PORT = "127.0.0.1", "127.0.0.2", 18080
MATMUL_N = 8192


class MatmulLoop:
    """Stand-in for inference on the seed GPU: timed bf16 matmuls on a side stream."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.log: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
            b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
            while not self._stop.is_set():
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.time()
                e0.record(stream)
                for _ in range(2):
                    torch.mm(a, b)
                e1.record(stream)
                e1.synchronize()
                self.log.append((t0, time.time(), e0.elapsed_time(e1) / 2))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def tflops(self, windows: list[tuple[float, float]]) -> tuple[float | None, int]:
        samples = [ms for (t0, t1, ms) in self.log if any(a <= t0 and t1 <= b for a, b in windows)]
        if not samples:
            return None, 0
        return 2 * MATMUL_N**3 / (statistics.median(samples) / 1e3) / 1e12, len(samples)


# ---- seed process (GPU 0) ---------------------------------------------------------------------------------------
def seed_main(models: list[str], to_client, from_client) -> None:
    from seedfork_agent import groups
    from seedfork_agent.agent import Agent, AgentConfig
    from seedfork_agent.store import WeightStore, layout

    torch.cuda.set_device(0)

    async def main() -> None:
        agent = Agent(
            AgentConfig(
                host=SEED_HOST, port=AGENT_PORT, token=TOKEN, fingerprint="bench", device="cuda:0",
                protocol="nvlink_intra", timeout_s=300,
            )
        )  # fmt: skip
        await agent.start()
        mm = MatmulLoop(0)
        mm.start()
        for model in models:
            manifest = layout(tensor_specs(model), "bench")
            store = WeightStore.empty(manifest, "cuda:0")
            for t in manifest.tensors:
                store.tensor(t.name).uniform_(-1, 1)
            torch.cuda.synchronize()
            store.compute_checksums()  # warm
            t0 = time.perf_counter()
            sums = store.compute_checksums()
            checksum_s = time.perf_counter() - t0
            store.manifest = manifest.with_checksums(sums)
            t0 = time.perf_counter()
            assert await agent.adopt(store), agent.attempt.report.error
            adopt_s = time.perf_counter() - t0
            info = {"register_s": adopt_s, "checksum_s": checksum_s, "attach": store.attach_info()}
            to_client.put(("ready", model, info))
            while True:
                cmd, *args = await asyncio.to_thread(from_client.get)
                if cmd == "idle":
                    await asyncio.sleep(args[0])
                    to_client.put(("ok",))
                elif cmd == "raw_nccl":
                    port, reps = args

                    def raw(port=port, reps=reps, store=store) -> None:
                        pg = groups.init_group("nccl", SEED_HOST, port, 2, 0, f"raw_{port}", 120, store.device)
                        for _ in range(reps):
                            torch.distributed.broadcast(store.buffer, src=0, group=pg)
                        torch.cuda.synchronize()
                        groups.destroy_group(pg)

                    await asyncio.to_thread(raw)
                    to_client.put(("ok",))
                elif cmd == "done":
                    windows = args[0]
                    result = {}
                    for phase, ws in windows.items():
                        tf, n = mm.tflops([tuple(w) for w in ws])
                        result[f"{model}_seed_matmul_{phase}_TFLOPs"] = tf
                        result[f"{model}_seed_matmul_{phase}_samples"] = n
                    agent.release()
                    torch.cuda.empty_cache()
                    to_client.put(("result", result))
                    break
        mm.stop()
        await agent.stop()

    asyncio.run(main())


# ---- client process (GPU 1) -------------------------------------------------------------------------------------
def client_main(models: list[str], pulls: dict[str, int], from_seed, to_seed, results) -> None:
    from seedfork_agent.puller import PullRequest, pull
    from seedfork_agent.store import attach_buffer
    from seedfork_agent.te import engine

    torch.cuda.set_device(1)
    dev = torch.device("cuda", 1)
    out: dict = {}
    port = 28000  # the seed's rendezvous ports: the default range's lower part

    def te_factory():
        return engine(CLIENT_HOST, "nvlink_intra", 300)

    for model in models:
        msg = from_seed.get()
        assert msg[0] == "ready", msg
        info = msg[2]
        windows: dict[str, list] = {"idle": []}
        t0 = time.time()
        to_seed.put(("idle", 2.0))
        from_seed.get()
        windows["idle"].append((t0 + 0.1, time.time() - 0.1))

        # Raw link 1: copy-engine peer copy of the seed's whole buffer, mapped through CUDA IPC.
        remote = attach_buffer(info["attach"])
        nbytes = remote.numel()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst.copy_(remote)
        torch.cuda.synchronize(dev)
        times = []
        windows["copy_engine"] = []
        for _ in range(3):
            a = time.time()
            t = time.perf_counter()
            dst.copy_(remote)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
            windows["copy_engine"].append((a, time.time()))
        out[f"{model}_bytes"] = nbytes
        out[f"{model}_raw_copy_engine_GBps"] = nbytes / min(times) / GB
        ce_ok = bool(torch.equal(dst[:4096].cpu(), remote[:4096].cpu()))
        del remote

        # Raw link 2: one NCCL broadcast of the whole buffer (first one warms up).
        from seedfork_agent import groups

        port += 1
        reps = 4
        to_seed.put(("raw_nccl", port, reps))
        pg = groups.init_group("nccl", SEED_HOST, port, 2, 1, f"raw_{port}", 120, dev)
        times = []
        windows["nccl_raw"] = []
        for i in range(reps):
            a = time.time()
            t = time.perf_counter()
            torch.distributed.broadcast(dst, src=0, group=pg)
            torch.cuda.synchronize(dev)
            if i:
                times.append(time.perf_counter() - t)
                windows["nccl_raw"].append((a, time.time()))
        groups.destroy_group(pg)
        from_seed.get()
        out[f"{model}_raw_nccl_GBps"] = nbytes / min(times) / GB
        del dst
        torch.cuda.empty_cache()

        # The agent's full pull, both backends.
        payload = None
        for backend in ("nccl", "transfer_engine"):
            rows = []
            windows[backend] = []
            for i in range(pulls[model] + 1):  # the first pull warms up (NCCL/TE connections, allocator)
                port += 1
                req = PullRequest(
                    seed_ip=SEED_HOST, seed_port=AGENT_PORT, token=TOKEN, backend=backend, fingerprint="bench",
                    group_ports=[port], client_id=f"bench{i}", timeout_s=300, device="cuda:1",
                )  # fmt: skip
                stats: dict = {}
                t = time.perf_counter()
                store = pull(req, te_factory, stats=stats)
                stats["total_s"] = time.perf_counter() - t
                payload = store.manifest.payload_bytes
                if backend == "transfer_engine":
                    te_factory().unregister(store.buffer.data_ptr())
                store.close()
                if i:
                    rows.append(stats)
                    windows[backend].append((stats["data_start"], stats["data_end"]))
                else:  # a new pod's only pull looks like this one (first TE handshake with the seed)
                    out[f"{model}_{backend}_first_pull_total_s"] = stats["total_s"]
            for key in ("manifest_s", "alloc_s", "register_s", "transfer_s", "verify_s", "total_s"):
                vals = [r[key] for r in rows if key in r]
                if vals:
                    out[f"{model}_{backend}_{key}"] = statistics.median(vals)
            out[f"{model}_{backend}_data_GBps"] = payload / statistics.median(
                [r["data_end"] - r["data_start"] for r in rows]
            ) / GB  # fmt: skip
            out[f"{model}_{backend}_pull_GBps"] = payload / out[f"{model}_{backend}_total_s"] / GB
            out[f"{model}_{backend}_pulls"] = len(rows)
        out[f"{model}_payload_bytes"] = payload
        out[f"{model}_copy_engine_check_ok"] = ce_ok
        out[f"{model}_seed_register_s"] = info["register_s"]
        out[f"{model}_checksum_GBps"] = nbytes / info["checksum_s"] / GB
        to_seed.put(("done", windows))
        msg = from_seed.get()
        out.update(msg[1])
        results.update(out)


def derive(r: dict, models: list[str]) -> None:
    for m in models:
        if f"{m}_transfer_engine_pull_GBps" not in r:
            continue  # that model's run did not finish; its raw numbers stay as measured
        ce, nccl = r[f"{m}_raw_copy_engine_GBps"], r[f"{m}_raw_nccl_GBps"]
        link = max(ce, nccl)
        for backend, raw in (("nccl", nccl), ("transfer_engine", ce)):
            r[f"{m}_{backend}_pull_vs_own_raw_ratio"] = r[f"{m}_{backend}_pull_GBps"] / raw
            r[f"{m}_{backend}_data_vs_own_raw_ratio"] = r[f"{m}_{backend}_data_GBps"] / raw
            r[f"{m}_{backend}_pull_vs_link_ratio"] = r[f"{m}_{backend}_pull_GBps"] / link
            r[f"{m}_{backend}_verify_GBps"] = r[f"{m}_payload_bytes"] / r[f"{m}_{backend}_verify_s"] / GB
        idle = r.get(f"{m}_seed_matmul_idle_TFLOPs")
        for phase in ("nccl", "transfer_engine", "copy_engine", "nccl_raw"):
            v = r.get(f"{m}_seed_matmul_{phase}_TFLOPs")
            if idle and v:
                r[f"{m}_seed_slowdown_{phase}"] = 1 - v / idle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "agent_gpu.json"))
    ap.add_argument("--models", default="llama8b,qwen32b")
    args = ap.parse_args()
    models = args.models.split(",")
    pulls = {"llama8b": 8, "qwen32b": 3}
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    to_client, to_seed = ctx.Queue(), ctx.Queue()
    seed = ctx.Process(target=seed_main, args=(models, to_client, to_seed))
    client = ctx.Process(target=client_main, args=(models, pulls, to_client, to_seed, results))
    seed.start()
    client.start()
    client.join(560)
    seed.join(30)
    for p in (client, seed):
        if p.is_alive():
            p.kill()
    r = dict(results)
    r["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    r["torch"] = torch.__version__
    derive(r, models)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1, sort_keys=True))
    print(f"{'metric':58s} value")
    for k in sorted(r):
        v = r[k]
        print(f"{k:58s} {v:.4g}" if isinstance(v, float) else f"{k:58s} {v}")
    sys.exit(0 if client.exitcode == 0 else 1)


if __name__ == "__main__":
    main()
