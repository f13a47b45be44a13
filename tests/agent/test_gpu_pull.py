"""GPU: a TransferEngine nvlink_intra pull, byte for byte, and a corrupted seed that it refuses.

The seed is an agent process on cuda:0; the client pulls on cuda:1 in a child process of its own (a
process has one TransferEngine, and the CPU tests' is TCP). The NVLink transport may return before its
copies land, so a pull that verified too early would fail here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
CLIENT = """
import json, sys
import torch
from safetensors.torch import load_file
from seedfork_agent.puller import PullError, PullRequest, pull
from seedfork_agent.te import engine

seed_ip, port, token, weights_dir = sys.argv[1:5]
req = PullRequest(seed_ip=seed_ip, seed_port=int(port), token=token, backend="transfer_engine",
                  fingerprint="fp-test", client_id="gpu-test", timeout_s=60, device="cuda:1")
stats = {}
try:
    store = pull(req, lambda: engine("127.0.0.1", "nvlink_intra", 60), stats=stats)
except PullError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
want = {}
for f in sorted(__import__("pathlib").Path(weights_dir).glob("*.safetensors")):
    want |= load_file(str(f))
same = all(torch.equal(store.tensor(n).cpu().view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
           for n, t in want.items())
print(json.dumps({"same": same, "names": len(want) == len(store.manifest.tensors), "stats": stats}))
"""


def _pull(kit, seed_ip: str, weights_dir) -> dict:
    path = [str(REPO / "agent"), str(REPO / "api"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    args = [sys.executable, "-c", CLIENT, seed_ip, str(kit.AGENT_PORT), kit.TOKEN, str(weights_dir)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_nvlink_pull_is_exact_and_refuses_corrupted_bytes(kit, agents, weights_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ip = kit.new_ip()
    seed = agents(*kit.seed_args(weights_dir, ip, "--device", "cuda:0", "--protocol", "nvlink_intra"), ip=ip)
    seed.wait_ready(120)
    good = _pull(kit, ip, weights_dir)
    assert good.get("same") is True and good["names"], good
    assert good["stats"]["verify_s"] >= 0 and good["stats"]["data_end"] >= good["stats"]["data_start"]

    # Flip one byte of the seed's GPU memory (mapped here over CUDA IPC): the pull must refuse it.
    torch.cuda.set_device(0)
    tensors = seed.tensors()
    name = sorted(tensors)[-2]
    tensors[name].view(-1).view(torch.uint8)[3] ^= 0x10
    torch.cuda.synchronize()
    bad = _pull(kit, ip, weights_dir)
    assert "checksum mismatch in 1 of" in bad.get("error", "") and name in bad["error"], bad
    seed.kill(signal.SIGTERM)
