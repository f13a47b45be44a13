"""Real vLLM compiling (torch.compile, Inductor C++ kernels): a new pod without and with the seed's engine cache.

One seed (agent + vLLM without ``--enforce-eager``, loading through ``--load-format seedfork``) compiles
into its cache directory and serves it. Then two new pods, one after the other (vLLM is the only heavy
thing on the machine at a time), each pull the weights from the seed and start their own vLLM:

- cold: the pod's engine-cache directory starts empty; its vLLM compiles everything;
- cache: the pod's agent fetches the seed's cache into it before offering the weights.

Per pod, from the agent's clock (PodTiming): the cache fetch, and compile/warm-up = the engine proved
its weights (engineAttached) -> its API answered (engineReady); and from vLLM's own log its "init engine
(profile, create kv cache, warmup model)" seconds. The ratio cold/cache of compile/warm-up is checked
against the 3x target.

    .venv/bin/python bench/engine_cache.py [--timeout 900] [--aot 0|1]

``--aot`` sets vLLM's VLLM_USE_AOT_COMPILE (unset: vLLM's default). Prints a table; writes
``bench/results/engine_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from seedfork_agent.engines.testmodel import make_model
from seedfork_api.contract import engine_cache_env
from seedfork_localdev import vllm

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-engine-cache"
AGENT_PORT = 18080
ENGINE_PORT = 8000
TARGET = 3.0
_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")


class Agent:
    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "SEEDFORK_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "seedfork_agent", *args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _wait(what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not after {timeout:.0f} s\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, headers=_auth(), timeout=10)
    except httpx.HTTPError:
        return None


def _gated(fingerprint: str, timeout: float, ip: str, cache: Path | None) -> list[str]:
    out = ["--host", ip, "--port", str(AGENT_PORT), "--fingerprint", fingerprint, "--device", "cpu",
           "--timeout", str(timeout), "--engine-ranks", "1", "--engine-url", f"http://{ip}:{ENGINE_PORT}/health",
           "--engine-version", vllm.VERSION]  # fmt: skip
    return out + (["--engine-cache", str(cache)] if cache else [])


def _engine(model: Path, ip: str, cache: Path, log: Path, timeout: float, aot: str | None) -> vllm.Server:
    contract = {"SEEDFORK_POD_IP": ip, "SEEDFORK_AGENT_PORT": str(AGENT_PORT), "SEEDFORK_TOKEN": TOKEN,
                "SEEDFORK_TIMEOUT_SECONDS": str(timeout), **engine_cache_env("vllm", str(cache))}  # fmt: skip
    if aot is not None:
        contract["VLLM_USE_AOT_COMPILE"] = aot
    return vllm.Server(model, ip, ENGINE_PORT, log, "seedfork", contract, compile=True)


def _kernels(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".so", ".cpp")}


def run_pod(
    kind: str, model: Path, seed_ip: str, ip: str, work: Path, timeout: float, aot: str | None, fetched: set[str]
) -> dict:
    cache = work / f"{kind}-cache"
    cache.mkdir()
    pull = ["pull", *_gated("fp-bench", timeout, ip, cache if kind == "cache" else None),
            "--seed", f"{seed_ip}:{AGENT_PORT}", "--backend", "transfer_engine"]  # fmt: skip
    agent = Agent(pull, work / f"{kind}-agent.log")
    engine = _engine(model, ip, cache, work / f"{kind}-vllm.log", timeout, aot)
    try:
        started = time.time()
        engine.wait_healthy(timeout)
        up = time.time()

        def ready() -> bool:
            r = _get(f"http://{ip}:{AGENT_PORT}/v1/progress")
            return r is not None and "engineReady" in r.json().get("timing", {})

        _wait(f"{kind} agent sees its engine up", ready, 60, agent.proc, agent.log)
        t = _get(f"http://{ip}:{AGENT_PORT}/v1/progress").json()["timing"]
        init = _INIT.findall(engine.output())
        return {
            "pod": kind,
            "engine_api_up_s": round(up - started, 2),
            "cache_fetch_s": round(t["cacheFetchEnd"] - t["cacheFetchStart"], 3) if kind == "cache" else None,
            "compile_warmup_s": round(t["engineReady"] - t["engineAttached"], 2),
            "vllm_init_engine_s": float(init[-1]) if init else None,
            # C++ kernels this pod's engine generated itself (a cache pod: beyond those it fetched)
            "kernels_compiled": len(_kernels(cache) - (fetched if kind == "cache" else set())),
            "recompiled": "Compiling model again" in engine.output(),
        }
    finally:
        engine.stop()
        agent.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--aot", choices=["0", "1"], default=None, help="VLLM_USE_AOT_COMPILE (default: vLLM's)")
    ap.add_argument("--net", default="127.77.0", help="the /24 of loopback addresses the pods take")
    args = ap.parse_args()
    vllm.python()  # build or find the vLLM environment before any clock starts
    with tempfile.TemporaryDirectory(prefix="seedfork-engine-cache-") as tmp:
        work = Path(tmp)
        model = make_model(work / "model", "vllm-tiny")
        seed_ip, cold_ip, cache_ip = (f"{args.net}.{n}" for n in (2, 3, 4))
        seed_cache = work / "seed-cache"
        seed_cache.mkdir()
        seed = Agent(["serve", *_gated("fp-bench", args.timeout, seed_ip, seed_cache), "--weights", str(model)],
                     work / "seed-agent.log")  # fmt: skip
        engine = _engine(model, seed_ip, seed_cache, work / "seed-vllm.log", args.timeout, args.aot)
        try:
            engine.wait_healthy(args.timeout)

            def offered() -> bool:
                r = _get(f"http://{seed_ip}:{AGENT_PORT}/v1/engine-cache")
                return r is not None and r.status_code == 200

            _wait("seed offers its engine cache", offered, 60, seed.proc, seed.log)
            archive = len(_get(f"http://{seed_ip}:{AGENT_PORT}/v1/engine-cache").content)
            seed_kernels = _kernels(seed_cache)
            engine.stop()  # one vLLM at a time: the seed's agent keeps serving weights and cache
            rows = [run_pod(k, model, seed_ip, ip, work, args.timeout, args.aot, seed_kernels)
                    for k, ip in (("cold", cold_ip), ("cache", cache_ip))]  # fmt: skip
        finally:
            engine.stop()
            seed.stop()
    cold, warm = rows
    ratio = cold["compile_warmup_s"] / max(warm["compile_warmup_s"], 1e-9)
    cols = ["pod", "cache_fetch_s", "compile_warmup_s", "vllm_init_engine_s", "engine_api_up_s", "kernels_compiled"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>18}" for c in cols))
    verdict = "meets" if ratio >= TARGET else "misses"
    print(f"compile/warm-up cold/cache: {ratio:.2f}x ({verdict} the {TARGET:.0f}x target); "
          f"seed cache: {len(seed_kernels)} kernel files, archive {archive} bytes")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "engine_cache",
        "engine": f"vllm {vllm.VERSION} (CPU build), vllm-tiny, torch.compile on",
        "vllm_use_aot_compile": args.aot,
        "pods": rows,
        "ratio_compile_warmup": round(ratio, 2),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "seed_cache_kernel_files": len(seed_kernels),
        "archive_bytes": archive,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    name = "engine_cache.json" if args.aot is None else f"engine_cache_aot{args.aot}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
