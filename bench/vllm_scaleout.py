"""Real vLLM on the local cluster: a replica from storage, a cold seeded pod and a promoted standby, in one run.

The scenario and its phases are ``seedfork_localdev.vllmscaleout``'s. Targets: the promoted standby Ready
>= 10x faster than the cold seeded pod and <= 1.5x its own transfer and verification (issue "time to first
token"); what each replica holds for weights <= 1.02x the engine's parameter bytes (issue "one copy of the
weights").

    .venv/bin/python bench/vllm_scaleout.py [--timeout 900]

Prints a table; writes ``bench/results/vllm_scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from seedfork_agent.engines.testmodel import make_model
from seedfork_localdev import vllm, vllmscaleout
from seedfork_localdev.cluster import api_client_for, install_crd
from seedfork_localdev.controlplane import ControlPlane
from seedfork_localdev.scenario import format_table

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_COLD_OVER_PROMOTED = 10.0
TARGET_PROMOTED_OVER_TRANSFER = 1.5


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def table(result: vllmscaleout.VllmScaleOut) -> str:
    figures = ["total_ready", "total_first_token", *vllmscaleout.PHASES]
    return format_table(
        ["pod", "source", *[f"{f} s" for f in figures], "held/params"],
        [
            [
                r["pod"],
                r["source"],
                *["-" if r["phases_s"][f] is None else f"{r['phases_s'][f]:.2f}" for f in figures],
                f"{r['held_over_engine_params']:.2f}",
            ]
            for r in result.pods
        ],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(RESULTS / "vllm_scaleout.json"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="seedfork-vllm-bench-") as tmp, ControlPlane() as cp:
        api = api_client_for(cp.kubeconfig)
        install_crd(api)
        model = make_model(Path(tmp) / "model", "vllm-tiny")
        result = vllmscaleout.run(api, cp.kubeconfig, Path(tmp) / "cluster", model, args.timeout)
    print(table(result))
    print(f"\nseeded / storage, creation -> Ready: {result.seeded_over_storage_ready:.2f} (same run, same machine)")
    standby = {
        **result.standby,
        "cold_seeded_over_promoted": result.cold_seeded_over_promoted,
        "promoted_over_transfer_and_verification": result.promoted_over_transfer_and_verification,
    }
    print(
        f"promoted standby: scale request -> Ready {standby['request_to_ready_s']:.2f} s, first token "
        f"{standby['request_to_first_token_s']:.2f} s; cold seeded pod / promoted "
        f"{standby['cold_seeded_over_promoted']:.1f} (target >= {TARGET_COLD_OVER_PROMOTED:g}); promoted / its "
        f"transfer and verification {standby['promoted_over_transfer_and_verification']:.2f} "
        f"(target <= {TARGET_PROMOTED_OVER_TRANSFER:g})"
    )
    doc = {
        "benchmark": "vllm_scaleout",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm": vllm.VERSION,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": load_at_start},
        "model": vllmscaleout.MODEL,
        "pods": result.pods,
        "seeded_over_storage_ready": result.seeded_over_storage_ready,
        "standby": standby,
        "targets": {
            "cold_seeded_over_promoted_min": TARGET_COLD_OVER_PROMOTED,
            "promoted_over_transfer_and_verification_max": TARGET_PROMOTED_OVER_TRANSFER,
        },
        "target_met": {
            "cold_seeded_over_promoted": standby["cold_seeded_over_promoted"] >= TARGET_COLD_OVER_PROMOTED,
            "promoted_over_transfer_and_verification": standby["promoted_over_transfer_and_verification"]
            <= TARGET_PROMOTED_OVER_TRANSFER,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
