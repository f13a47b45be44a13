"""The end-to-end scale-out scenario on a local cluster, shared by ``make demo``, the e2e tests and the benchmark.

Development/test tooling, not part of the product. A ``LocalCluster`` (``cluster.py``) is the real local
control plane (etcd + kube-apiserver) with the CRD installed, the local pod runner playing scheduler and
kubelet, and the operator running as its own process, all scoped to one namespace. A ``ReferenceSet``
(``referenceset.py``) is one ModelReplicaSet of seedfork's reference engine (``manifests.py``);
``PodTracker`` (``pods.py``) watches its pods and records when each reached each milestone, which is what
the time-to-Ready breakdown is computed from. ``scale_out`` here runs the scenario itself.

Every process is started in its own session (process group) and stopped with it (``processes.py``), so
leaving the ``with`` block leaves nothing running, also after a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .cluster import LocalCluster
from .pods import PodRow, PodTracker
from .processes import child_env
from .referenceset import ReferenceSet
from .timetoready import Breakdown, breakdown
from .waiting import ScenarioError

# The prompt every replica answers in the identical-output check.
PROMPT = "seedfork scales out by"


# ---------------------------------------------------------------- engine calls


def generate(row: PodRow, token: str, prompt: str = PROMPT, max_new_tokens: int = 8, port: int = 30000) -> str:
    """Ask one replica's engine (on its pod IP) for a greedy completion; returns the new token ids as text
    (the test model's weights are random, so its bytes are rarely printable)."""
    r = httpx.post(
        f"http://{row.ip}:{port}/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    )
    r.raise_for_status()
    return " ".join(str(t) for t in r.json()["output_ids"])


def generate_all(rows: Sequence[PodRow], token: str, prompt: str = PROMPT) -> dict[str, str]:
    """The same prompt to every replica at once; pod name -> output token ids."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(rows))) as pool:
        texts = list(pool.map(lambda row: generate(row, token, prompt), rows))
    return {row.name: text for row, text in zip(rows, texts, strict=True)}


def engine_info(row: PodRow, token: str, port: int = 30000) -> dict[str, Any]:
    """The engine's own view (mode, device, attach and re-check timings)."""
    r = httpx.get(f"http://{row.ip}:{port}/v1/engine", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


# ---------------------------------------------------------------- the scenario


@dataclass
class ScaleOut:
    """What one scale-out run produced: the Ready pods, their outputs and their time-to-Ready breakdown."""

    set_name: str
    backend: str
    replicas_from: int
    replicas_to: int
    scale_requested_at: float
    rows: list[PodRow]
    outputs: dict[str, str]
    engines: dict[str, dict[str, Any]]
    breakdowns: list[Breakdown]
    seen: dict[str, dict[str, float]]
    scale_out_seconds: float  # scale request -> all target replicas Ready

    @property
    def identical(self) -> bool:
        return len(set(self.outputs.values())) == 1 and len(self.outputs) == self.replicas_to

    def breakdown_of(self, pod: str) -> Breakdown:
        return next(b for b in self.breakdowns if b.pod == pod)


def breakdowns_for(
    rows: Sequence[PodRow], tracker: PodTracker, engines: Mapping[str, Mapping[str, Any]]
) -> list[Breakdown]:
    return [
        breakdown(
            row.name,
            row.origin,
            tracker.times.get(row.name, {}),
            row.timing,
            (engines.get(row.name) or {}).get("timings"),
        )
        for row in rows
    ]


def scale_out(
    rset: ReferenceSet,
    tracker: PodTracker,
    *,
    body: Mapping[str, Any],
    replicas_to: int,
    timeout: float,
    on_poll: Callable[[list[PodRow]], None] | None = None,
    cluster: LocalCluster | None = None,
) -> ScaleOut:
    """Create the set (``body``, usually ``replicas: 1``), wait until it is Ready, scale it to
    ``replicas_to`` through the scale subresource, wait until all are Ready, then ask every replica
    for the same greedy completion."""

    def poll(rows: list[PodRow]) -> None:
        if cluster is not None:
            cluster.check_alive()
        if on_poll:
            on_poll(rows)

    replicas_from = int(body["spec"]["replicas"])
    rset.create(body)
    rset.wait_ready(replicas_from, timeout, poll)
    requested = time.time()
    rset.scale(replicas_to)
    rows = rset.wait_ready(replicas_to, timeout, poll)
    done = time.time()
    # The rows as the tracker last saw them carry the final annotations (timing is written with the report).
    token = rset.token()
    outputs = generate_all(rows, token)
    engines = {row.name: engine_info(row, token) for row in rows}
    rows = rset.rows()
    rows = [r for r in rows if not r.deleting]
    return ScaleOut(
        set_name=rset.name,
        backend=str(body["spec"]["transfer"]["backend"]),
        replicas_from=replicas_from,
        replicas_to=replicas_to,
        scale_requested_at=requested,
        rows=rows,
        outputs=outputs,
        engines=engines,
        breakdowns=breakdowns_for(rows, tracker, engines),
        seen={k: dict(v) for k, v in tracker.times.items()},
        scale_out_seconds=done - requested,
    )


def make_model(out: Path | str, size: str = "tiny") -> Path:
    """The deterministic test model, written by the reference engine's own ``make-model`` command."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    argv = [sys.executable, "-m", "seedfork_agent.engines.reference", "make-model", "--out", str(out), "--size", size]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return out


def make_model_like(out: Path | str, **config: Any) -> Path:
    """A deterministic model of another shape than the named sizes (e.g. one big enough that a
    bandwidth-capped transfer lasts seconds), from the test model's own weight generator."""
    from safetensors.torch import save_file

    from seedfork_agent.engines.llama import LlamaConfig
    from seedfork_agent.engines.testmodel import make_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**config)
    weights = make_weights(cfg)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(weights, "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(cfg.to_json())
    return out


def model_bytes(model_dir: Path | str) -> int:
    index = Path(model_dir) / "model.safetensors.index.json"
    return int(json.loads(index.read_text())["metadata"]["total_size"])


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[str(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)
