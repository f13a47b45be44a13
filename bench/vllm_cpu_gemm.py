"""What one copy of the weights costs vLLM's CPU build: its linear layers without the oneDNN repack.

vLLM's CPU build repacks every unquantized linear weight into oneDNN's own layout after the load and
frees the plain weight; the packed copy is private to oneDNN, so no one else can serve it. seedfork's
loader keeps the plain weight instead (vLLM's own ``_cpu_skip_gemm_dispatch`` path: ``F.linear`` on the
parameter), so that the parameters are the pod's one store. This measures both paths side by side in
one process, on the projection shapes of a Llama-3.2-1B-sized layer, for decode-sized and prefill-sized
batches: ``plain / onednn`` > 1 means the plain path is slower.

    <vLLM environment>/bin/python bench/vllm_cpu_gemm.py      # the environment scripts/setup_vllm.sh builds

Prints a table; writes ``bench/results/vllm_cpu_gemm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192)}
BATCHES = (1, 8, 64, 256)


def timed(fn, reps: int) -> float:
    fn()  # warm: oneDNN picks and caches its primitive on the first call
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=str(RESULTS / "vllm_cpu_gemm.json"))
    args = ap.parse_args()
    import vllm
    from vllm import _custom_ops as ops

    rows, skipped = [], {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for layer, (n, k) in SHAPES.items():
            weight = torch.randn(n, k, dtype=dtype)
            try:
                handle = ops.create_onednn_mm(weight.t(), 32)  # what vLLM's CPU dispatch does
            except RuntimeError as e:  # vLLM then falls back to F.linear itself: nothing is given up
                skipped[dtype_name] = f"oneDNN has no matmul for {dtype_name} on this CPU: {str(e)[:120]}"
                break
            for m in BATCHES:
                x = torch.randn(m, k, dtype=dtype)
                onednn = timed(lambda x=x, h=handle: ops.onednn_mm(h, x, None), args.reps)
                plain = timed(lambda x=x, w=weight: torch.nn.functional.linear(x, w, None), args.reps)
                rows.append(
                    {"dtype": dtype_name, "layer": layer, "n": n, "k": k, "m": m,
                     "onednn_ms": onednn * 1e3, "plain_ms": plain * 1e3, "plain_over_onednn": plain / onednn}
                )  # fmt: skip
    print(f"{'dtype':>9} {'layer':>13} {'m':>4} {'oneDNN ms':>10} {'plain ms':>9} {'plain/oneDNN':>13}")
    for r in rows:
        print(
            f"{r['dtype']:>9} {r['layer']:>13} {r['m']:>4} {r['onednn_ms']:>10.2f} {r['plain_ms']:>9.2f} "
            f"{r['plain_over_onednn']:>13.2f}"
        )
    for dtype_name, why in skipped.items():
        print(f"{dtype_name}: {why}")
    by_m = {m: statistics.median(r["plain_over_onednn"] for r in rows if r["m"] == m) for m in BATCHES if rows}
    print("median plain/oneDNN by batch: " + ", ".join(f"m={m}: {v:.2f}" for m, v in by_m.items()))
    doc = {
        "benchmark": "vllm_cpu_gemm",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]},
        "rows": rows,
        "skipped": skipped,
        "median_plain_over_onednn_by_batch": {str(m): v for m, v in by_m.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
