"""Fan-out benchmark: one seed, N-1 new replicas on one host; how long until all of them hold verified weights.

A seed agent on GPU 0 serves a Llama-8B-shaped bf16 weight set (16 GB); a new agent on each of GPUs 1..N-1
pulls it with the agent's real pull (manifest, allocate, transfer, verify every checksum, then serve). One run
measures, side by side:
  single_nccl, single_te          one pull seed -> client 1 (the baseline of each backend);
  one_by_one_nccl, one_by_one_te  clients 1..N-1 pull one after the other from the seed;
  cohort_nccl                     one R-Fork cohort group (world N): one broadcast from the seed reaches all N-1;
  tree_te                         TransferEngine doubling: round 1 seed->c1; round 2 seed->c2 and c1->c3; ...
                                  each verified client serves the next round (its agent serves what it pulled).
For each: seconds until all N-1 clients are verified and the ratio to the single pull of the same backend
(keys ending in "_ratio"). Target: cohort_nccl <= 1.5x single_nccl with N-1 = 7 clients. Every client's store
must carry the seed's fingerprint and manifest digest; in CPU mode (or with --byte-check) its bytes are also
compared with the seed's, tensor by tensor.

    python bench/fanout_gpu.py [--gpus 4] [--out bench/results/fanout_gpu.json] [--deadline-s 150]
    python bench/fanout_gpu.py --device cpu --clients 3 --model tiny     # CPU check: gloo and TransferEngine tcp

One process per GPU (spawn), each an Agent on its own loopback address (seed 127.0.0.1, client i 127.0.0.(2+i)),
driven through queues. Past --deadline-s the driver writes what it has, kills its children and exits nonzero.
Needs torch, aiohttp, httpx, prometheus-client and mooncake-transfer-engine (the CUDA wheel on GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import queue
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

T0 = time.monotonic()  # the deadline counts from process start, torch import included
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "agent"), str(REPO / "api")]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # Mooncake: no per-engine INFO lines; warnings and errors stay

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from seedfork_agent.engines.testmodel import tensor_specs  # noqa: E402

GB = 1e9
TOKEN = "bench-token"
FINGERPRINT = "bench-fanout"
SCENARIOS = ("single_nccl", "single_te", "one_by_one_nccl", "one_by_one_te", "cohort_nccl", "tree_te")
TARGET_RATIO, TARGET_CLIENTS = 1.5, 7


def host(cfg: dict, rank: int) -> str:
    """Rank 0 (the seed) is <net>.1, client i (rank i+1) is <net>.(2+i)."""
    return f"{cfg['net']}.{rank + 1}"


# ---- one process per GPU: an agent driven through a queue ---------------------------------------------------------
def worker_main(rank: int, cfg: dict, cmds, out) -> None:
    try:
        asyncio.run(_worker(rank, cfg, cmds, out))
    except BaseException:
        out.put(("crash", 0, rank, {"error": traceback.format_exc()}))
        raise


async def _worker(rank: int, cfg: dict, cmds, out) -> None:
    import logging

    from seedfork_agent.agent import Agent, AgentConfig
    from seedfork_agent.store import WeightStore, attach_buffer, layout

    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    cuda = cfg["device"] == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    agent = Agent(
        AgentConfig(
            host=host(cfg, rank), port=cfg["agent_port"], token=TOKEN, fingerprint=FINGERPRINT, device=device,
            protocol=cfg["protocol"], timeout_s=cfg["timeout_s"], client_id=f"fanout{rank}",
            port_range=(cfg["group_port"], cfg["group_port"] + 499),  # every rendezvous port the run hands out
        )
    )  # fmt: skip
    await agent.start()
    info: dict = {"device_name": torch.cuda.get_device_name(rank) if cuda else "cpu"}
    if rank == 0:
        t0 = time.perf_counter()
        manifest = layout(tensor_specs(cfg["model"]), FINGERPRINT)
        store = WeightStore.empty(manifest, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for t in manifest.tensors:
            store.tensor(t.name).uniform_(-1, 1, generator=gen)
        store.manifest = manifest.with_checksums(store.compute_checksums())
        assert await agent.adopt(store), agent.attempt.report.error
        info.update(
            setup_s=time.perf_counter() - t0, digest=store.manifest.digest, fingerprint=store.manifest.fingerprint,
            payload_bytes=store.manifest.payload_bytes, total_bytes=store.nbytes, tensors=len(manifest.tensors),
            attach=store.attach_info(), te=agent.te is not None,
        )  # fmt: skip
    out.put(("ready", 0, rank, info))
    attempt = 0
    while True:
        kind, cid, *args = await asyncio.to_thread(_next_command, cmds)
        if kind == "pull":
            src, backend, group_port, cohort = args
            kw: dict = {"group_ports": [group_port] if group_port else []}
            if cohort:
                kw.update(cohort_id=cohort[0], cohort_rank=cohort[1], cohort_size=cohort[2])
            req = agent.request(host(cfg, src), cfg["agent_port"], backend, **kw)
            attempt += 1
            t0 = time.time()
            ok = await agent.pull_seed(req, attempt)
            t1 = time.time()
            body = {"ok": ok, "t0": t0, "t1": t1, "src": src, "error": None if ok else agent.attempt.report.error}
        elif kind == "check":
            (seed_attach,) = args
            store = agent.store
            body = {"serving": agent.serving, "te": agent.te is not None}
            if store is not None:
                body.update(fingerprint=store.manifest.fingerprint, digest=store.manifest.digest)
                if seed_attach is not None:
                    body["bytes_equal"] = await asyncio.to_thread(_same_bytes, store, attach_buffer(seed_attach))
        elif kind == "release":
            agent.release()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            body = {"allocated": torch.cuda.memory_allocated(rank) if cuda else 0}
        elif kind == "stop":
            await agent.stop()
            out.put(("stopped", cid, rank, {}))
            return
        else:
            body = {"error": f"unknown command {kind}"}
        out.put((kind, cid, rank, body))


def _next_command(cmds) -> tuple:
    """The driver's next command; a worker whose driver is gone stops (frees its store) instead of holding it."""
    parent = mp.parent_process()
    while True:
        try:
            return cmds.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return ("stop", 0)


def _same_bytes(store, seed_buffer: torch.Tensor) -> bool:
    """Every tensor's bytes equal the seed's (the seed's buffer mapped: shm on CPU, CUDA IPC on GPU)."""
    if store.device.type == "cuda":
        torch.cuda.set_device(store.device)
    try:
        for t in store.manifest.tensors:
            theirs = seed_buffer[t.offset : t.offset + t.nbytes].to(store.device)
            if not torch.equal(store.raw(t.name), theirs):
                return False
        return True
    finally:
        del seed_buffer
        if store.device.type == "cuda":
            torch.cuda.synchronize(store.device)
            torch.cuda.empty_cache()


# ---- the driver ---------------------------------------------------------------------------------------------------
class Deadline(Exception):
    pass


class WorkerDied(Exception):
    pass


class Driver:
    def __init__(self, cfg: dict, procs, cmd_qs, out, deadline: float) -> None:
        self.cfg, self.procs, self.cmd_qs, self.out, self.deadline = cfg, procs, cmd_qs, out, deadline
        self.ids = itertools.count(1)
        self.ports = itertools.count(cfg["group_port"])
        self.cohorts = itertools.count(1)
        self.seed: dict = {}

    def send(self, rank: int, kind: str, *args) -> int:
        cid = next(self.ids)
        self.cmd_qs[rank].put((kind, cid, *args))
        return cid

    def _next(self, during: str = "") -> tuple[str, int, int, dict] | None:
        """The next worker message, or None after a quiet second; a crashed or dead worker raises."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline()
        try:
            kind, cid, rank, body = self.out.get(timeout=min(1.0, left))
        except queue.Empty:
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
            if dead:
                raise WorkerDied(f"worker(s) {dead} exited{during}") from None
            return None
        if kind == "crash":
            raise WorkerDied(f"rank {rank} crashed{during}:\n{body['error']}")
        return kind, cid, rank, body

    def wait(self, cids) -> dict[int, dict]:
        """Bodies of the replies to ``cids``, keyed by command id."""
        want, got = set(cids), {}
        while want - got.keys():
            msg = self._next()
            if msg and msg[1] in want:
                _, cid, rank, body = msg
                got[cid] = {**body, "rank": rank}
        return got

    def wait_ready(self, n: int) -> dict[int, dict]:
        ready: dict[int, dict] = {}
        while len(ready) < n:
            msg = self._next(" during start")
            if msg and msg[0] == "ready":
                _, _, rank, body = msg
                ready[rank] = body
        return ready

    # ---- one repetition of one scenario: {"s", "ok", "verified", "errors", "client_s", ...} ----------------------
    def pulls(self, pairs: list[tuple[int, int]], backend: str, cohort: bool = False) -> tuple[float, list[dict]]:
        """Pull concurrently, one (src, dst) pair each; returns the dispatch time and the replies."""
        port = next(self.ports) if cohort else None
        cohort_id = f"fan{next(self.cohorts)}" if cohort else None
        t = time.time()
        cids = []
        for i, (src, dst) in enumerate(pairs):
            group_port = port if cohort else (next(self.ports) if backend == "nccl" else None)
            spec = (cohort_id, i + 1, len(pairs) + 1) if cohort else None
            cids.append(self.send(dst, "pull", src, backend, group_port, spec))
        replies = self.wait(cids)
        return t, [replies[c] for c in cids]

    def run_rep(self, name: str) -> dict:
        clients = list(range(1, len(self.procs)))
        backend = "nccl" if name.endswith("_nccl") else "transfer_engine"
        rows: list[dict] = []
        start = time.time()
        rounds: list[float] = []
        if name.startswith("single"):
            _, rows = self.pulls([(0, clients[0])], backend)
        elif name.startswith("one_by_one"):
            for c in clients:
                _, r = self.pulls([(0, c)], backend)
                rows += r
        elif name == "cohort_nccl":
            _, rows = self.pulls([(0, c) for c in clients], backend, cohort=True)
        elif name == "tree_te":
            servers, pending = [0], list(clients)
            while pending:
                pairs = list(zip(servers, pending, strict=False))
                pending = pending[len(pairs) :]
                t, r = self.pulls(pairs, backend)
                rows += r
                rounds.append(max(x["t1"] for x in r) - t)
                servers += [x["rank"] for x in r if x["ok"]]
                if not all(x["ok"] for x in r):
                    break
        else:
            raise ValueError(name)
        pulled = [x["rank"] for x in rows]
        errors = [f"rank {x['rank']} from {x['src']}: {x['error']}" for x in rows if not x["ok"]]
        ok_ranks = [x["rank"] for x in rows if x["ok"]]
        # Verified stores must be the seed's weights: same fingerprint and manifest digest (and bytes, if asked).
        seed_attach = self.seed["attach"] if self.cfg["byte_check"] else None
        checks = self.wait([self.send(r, "check", seed_attach) for r in ok_ranks]).values()
        verified = 0
        for c in checks:
            good = (
                c.get("serving")
                and c.get("fingerprint") == self.seed["fingerprint"]
                and c.get("digest") == self.seed["digest"]
                and c.get("bytes_equal", True)
            )
            if good:
                verified += 1
            else:
                errors.append(f"rank {c['rank']}: store differs from the seed's: {c}")
        released = self.wait([self.send(r, "release") for r in pulled]).values()
        leaked = {x["rank"]: x["allocated"] for x in released if x["allocated"] > (1 << 20)}
        all_ok = verified == (1 if name.startswith("single") else len(clients)) and not errors
        end = max((x["t1"] for x in rows), default=start)
        return {
            "s": end - start if all_ok else None,
            "ok": all_ok,
            "verified": verified,
            "errors": errors,
            "client_s": [round(x["t1"] - start, 4) for x in rows],
            "pull_s": [round(x["t1"] - x["t0"], 4) for x in rows],
            "round_s": rounds,
            "leaked_bytes": leaked,
        }


def record(r: dict, name: str, reps: list[dict], warm: list[dict], n_clients: int, payload: int) -> None:
    measured = [x["s"] for x in reps if x["s"] is not None]
    r[f"{name}_clients"] = n_clients
    r[f"{name}_clients_verified"] = min((x["verified"] for x in reps), default=0)
    r[f"{name}_all_verified"] = bool(reps) and all(x["ok"] for x in reps)
    r[f"{name}_s"] = statistics.median(measured) if measured and r[f"{name}_all_verified"] else None
    r[f"{name}_rep_s"] = [x["s"] for x in reps]
    r[f"{name}_warmup_s"] = [x["s"] for x in warm]
    if reps:
        last = reps[-1]
        r[f"{name}_client_s"] = last["client_s"]
        r[f"{name}_pull_s"] = [x for rep in reps if rep["ok"] for x in rep["pull_s"]]  # each client's own pull
        if last["round_s"]:
            r[f"{name}_rounds"] = len(last["round_s"])
            r[f"{name}_round_s"] = last["round_s"]
        if last["leaked_bytes"]:
            r[f"{name}_leaked_bytes_after_release"] = last["leaked_bytes"]
    errors = [e for x in warm + reps for e in x["errors"]]
    if errors:
        r[f"{name}_errors"] = errors[:8]
    if r[f"{name}_s"]:
        r[f"{name}_aggregate_GBps"] = n_clients * payload / r[f"{name}_s"] / GB


def derive(r: dict) -> None:
    # A second baseline, steadier than one measured single pull: the median of every seed -> one client pull of
    # the run (single and one-by-one: the same operation, N times more samples).
    for b in ("nccl", "te"):
        pulls = r.get(f"single_{b}_pull_s", []) + r.get(f"one_by_one_{b}_pull_s", [])
        if pulls:
            r[f"single_{b}_median_pull_s"] = statistics.median(pulls)
    for name in SCENARIOS:
        if name.startswith("single"):
            continue
        b = "nccl" if name.endswith("_nccl") else "te"
        base, median = r.get(f"single_{b}_s"), r.get(f"single_{b}_median_pull_s")
        if r.get(f"{name}_s") and base:
            r[f"{name}_vs_single_ratio"] = r[f"{name}_s"] / base
        if r.get(f"{name}_s") and median:
            r[f"{name}_vs_median_pull_ratio"] = r[f"{name}_s"] / median
    ratio = r.get("cohort_nccl_vs_single_ratio")
    r["target"] = f"cohort_nccl_vs_single_ratio <= {TARGET_RATIO} with {TARGET_CLIENTS} clients"
    r["target_applies"] = r.get("clients") == TARGET_CLIENTS
    r["cohort_target_met"] = None if ratio is None else ratio <= TARGET_RATIO


def table(r: dict) -> str:
    lines = [
        f"fan-out of {r.get('bytes', 0) / GB:.3f} GB ({r.get('model')}, {r.get('tensors')} tensors) from rank 0 to "
        f"{r.get('clients')} clients on {r.get('device')} ({r.get('device_type')}, {r.get('gpus_used')} of "
        f"{r.get('gpu_count')} GPUs), torch {r.get('torch')}, groups {r.get('group_backend')}, "
        f"TE {r.get('te_protocol')}",
        f"{'scenario':18s} {'clients':>7s} {'rounds':>6s} {'seconds':>9s} {'vs single':>9s} {'vs median':>9s} "
        f"{'GB/s agg':>9s} verified",
    ]
    for name in SCENARIOS:
        if f"{name}_clients" not in r:
            lines.append(f"{name:18s} (not run)")
            continue
        s, agg = r.get(f"{name}_s"), r.get(f"{name}_aggregate_GBps")
        ratios = []
        for key in ("vs_single_ratio", "vs_median_pull_ratio"):
            v = r.get(f"{name}_{key}")
            if name.startswith("single"):
                base = s if key == "vs_single_ratio" else r.get(f"{name}_median_pull_s")
                v = s / base if s and base else None
            ratios.append("-" if v is None else f"{v:.2f}x")
        lines.append(
            f"{name:18s} {r[f'{name}_clients']:7d} {r.get(f'{name}_rounds', 1):6d} "
            f"{'-' if s is None else f'{s:.3f}':>9s} {ratios[0]:>9s} {ratios[1]:>9s} "
            f"{'-' if agg is None else f'{agg:.1f}':>9s} "
            f"{r[f'{name}_clients_verified']}/{r[f'{name}_clients']}"
        )
    met = r.get("cohort_target_met")
    applies = "" if r.get("target_applies") else f" (measured with {r.get('clients')} clients; target is for 7)"
    lines.append(f"target: {r.get('target')}: {'n/a' if met is None else ('met' if met else 'NOT met')}{applies}")
    lines.append("vs single: / the run's one measured single pull; vs median: / the median of all its seed->1 pulls")
    lines.append(f"wall {r.get('wall_s', 0):.1f} s, complete: {r.get('complete')}")
    return "\n".join(lines)


def versions() -> dict:
    from importlib import metadata

    out: dict = {}
    for dist in ("mooncake-transfer-engine-cuda13", "mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda"):
        try:
            out["mooncake"] = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all); clients = gpus - 1")
    ap.add_argument("--clients", type=int, default=None, help="clients (CPU mode: processes; default 3)")
    ap.add_argument(
        "--model", choices=["tiny", "llama8b", "qwen32b"], default=None, help="default llama8b, tiny on cpu"
    )
    ap.add_argument("--reps", type=int, default=1, help="measured repetitions per scenario (after 1 warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=None, help="JSON (default bench/results/fanout_gpu.json, fanout_cpu.json on cpu)")
    ap.add_argument("--deadline-s", type=float, default=150.0, help="write what is measured and exit nonzero after")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="the agents' per-transfer timeout")
    ap.add_argument("--net", default="127.0.0", help="first three octets of the agents' loopback addresses")
    ap.add_argument("--agent-port", type=int, default=18080)
    ap.add_argument("--group-port", type=int, default=28000, help="first NCCL/gloo rendezvous port")
    ap.add_argument(
        "--byte-check", action=argparse.BooleanOptionalAction, default=None,
        help="also compare every client's bytes with the seed's (default: on for cpu, off for cuda)",
    )  # fmt: skip
    args = ap.parse_args()
    t_start = T0
    deadline = t_start + args.deadline_s
    cuda = args.device == "cuda"
    gpu_count = torch.cuda.device_count()
    if cuda:
        n = args.clients + 1 if args.clients else (args.gpus or gpu_count)
        if n < 2 or n > gpu_count:
            sys.exit(f"need 2..{gpu_count} GPUs, asked for {n}")
    else:
        n = (args.clients or 3) + 1
    model = args.model or ("llama8b" if cuda else "tiny")
    out_path = Path(args.out or REPO / "bench" / "results" / f"fanout_{'gpu' if cuda else 'cpu'}.json")
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    cfg = {
        "device": args.device, "model": model, "net": args.net, "agent_port": args.agent_port,
        "group_port": args.group_port, "timeout_s": args.timeout_s, "protocol": "nvlink_intra" if cuda else "tcp",
        "byte_check": (not cuda) if args.byte_check is None else args.byte_check,
    }  # fmt: skip
    r: dict = {
        "benchmark": "fanout", "device_type": args.device, "gpu_count": gpu_count, "gpus_used": n if cuda else 0,
        "processes": n, "clients": n - 1, "model": model, "torch": torch.__version__, "reps": args.reps,
        "warmup": args.warmup, "group_backend": "nccl" if cuda else "gloo", "te_protocol": cfg["protocol"],
        "byte_check": cfg["byte_check"], "addresses": [host(cfg, i) for i in range(n)], "complete": False,
        "deadline_s": args.deadline_s, **versions(),
    }  # fmt: skip

    def terminated(signum, frame):
        raise KeyboardInterrupt  # a timeout's SIGTERM still writes what was measured and kills the workers

    signal.signal(signal.SIGTERM, terminated)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    cmd_qs = [ctx.Queue() for _ in range(n)]
    procs = [
        ctx.Process(target=worker_main, args=(i, cfg, cmd_qs[i], out), name=f"fanout-{i}", daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    driver = Driver(cfg, procs, cmd_qs, out, deadline)
    code = 1
    try:
        ready = driver.wait_ready(n)
        driver.seed = ready[0]
        r["startup_s"] = time.monotonic() - t_start
        r["seed_setup_s"] = ready[0]["setup_s"]
        r["device"] = ready[0]["device_name"]
        r["bytes"] = ready[0]["payload_bytes"]
        r["buffer_bytes"] = ready[0]["total_bytes"]
        r["tensors"] = ready[0]["tensors"]
        r["seed_serves_te"] = ready[0]["te"]
        print(f"{n} agents ready in {r['startup_s']:.1f} s (seed setup {r['seed_setup_s']:.1f} s)", flush=True)
        for name in scenarios:
            warm = [driver.run_rep(name) for _ in range(args.warmup)]
            reps = [driver.run_rep(name) for _ in range(args.reps)]
            record(r, name, reps, warm, 1 if name.startswith("single") else n - 1, r["bytes"])
            s = r[f"{name}_s"]
            print(f"{name}: {'failed' if s is None else f'{s:.3f} s'} ({time.monotonic() - t_start:.1f} s)", flush=True)
        r["complete"] = all(r.get(f"{s}_all_verified") for s in scenarios)
        code = 0 if r["complete"] else 1
    except Deadline:
        r["deadline_hit"] = True
        r.setdefault("errors", []).append(f"deadline of {args.deadline_s:.0f} s reached")
        code = 2
    except WorkerDied as e:
        r.setdefault("errors", []).append(str(e)[-4000:])
        print(str(e), file=sys.stderr)
    except KeyboardInterrupt:
        r.setdefault("errors", []).append("interrupted")
        code = 3
    finally:
        derive(r)
        r["wall_s"] = time.monotonic() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
        print(table(r))
        print(f"wrote {out_path}", flush=True)
        shutdown(procs, cmd_qs, graceful=code in (0, 1), wait_s=min(15.0, max(1.0, deadline - time.monotonic())))
    sys.exit(code)


def shutdown(procs, cmd_qs, graceful: bool, wait_s: float) -> None:
    """Stop the workers (the agents close their stores); kill any that do not exit in time."""
    if graceful:
        try:
            for i, p in enumerate(procs):
                if p.is_alive():
                    cmd_qs[i].put(("stop", 0))
            end = time.monotonic() + wait_s
            for p in procs:
                p.join(max(0.1, end - time.monotonic()))
        except KeyboardInterrupt:
            pass  # killed below
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
        if p.exitcode:
            print(f"{p.name} exit code {p.exitcode}", file=sys.stderr)
    for q in cmd_qs:
        q.cancel_join_thread()


if __name__ == "__main__":
    main()
