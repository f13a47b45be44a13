"""bench/fanout_gpu.py in its CPU mode (gloo, TransferEngine tcp, tiny weights): every scenario gets every client
verified with the seed's bytes. Checks the benchmark's plumbing only; no timing is asserted."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("single_nccl", "single_te", "one_by_one_nccl", "one_by_one_te", "cohort_nccl", "tree_te")


def test_fanout_bench_cpu_two_clients(tmp_path):
    out = tmp_path / "fanout_cpu.json"
    net = f"127.{random.randint(20, 230)}.{random.randint(100, 250)}"  # conftest's agents use x.y.(0..3).z
    cmd = [
        sys.executable, str(REPO / "bench" / "fanout_gpu.py"), "--device", "cpu", "--clients", "2", "--model", "tiny",
        "--out", str(out), "--net", net, "--group-port", str(30000 + random.randint(0, 100) * 20),
        "--deadline-s", "200",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["complete"] is True and r["clients"] == 2 and r["byte_check"] is True
    assert r["group_backend"] == "gloo" and r["te_protocol"] == "tcp" and r["bytes"] > 0
    for name in SCENARIOS:
        want = 1 if name.startswith("single") else 2
        assert r[f"{name}_all_verified"] is True, (name, r.get(f"{name}_errors"))
        assert r[f"{name}_clients"] == r[f"{name}_clients_verified"] == want, name
        assert r[f"{name}_s"] > 0, name
        if not name.startswith("single"):
            assert any(k.startswith(name) and "ratio" in k for k in r), name
    assert r["tree_te_rounds"] == 2  # seed -> c1; then seed -> c2 (one client left for two servers)
