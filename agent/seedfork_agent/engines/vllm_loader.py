"""seedfork's model loader for vLLM (``--load-format seedfork``): the weights come from the pod's agent.

It runs inside vLLM's worker processes, registered through vLLM's plugin entry point
(``vllm.general_plugins``: ``seedfork = seedfork_agent.engines.vllm_loader:register``), and takes the
place of vLLM's own weight loading during vLLM's own start-up:

1. vLLM builds the model (its parameters allocated, nothing loaded).
2. Each worker asks the agent for the store (``GET /v1/attach``, the set's token) and waits until the
   agent offers verified weights: from storage for the first replica, from a seed for the others. The
   wait is bounded by the set's timeout, counted afresh whenever the agent starts a new attempt (a retry
   from another seed or storage), so an agent that fails or stops answering ends it within that bound.
3. It maps the store (the shared-memory file on CPU, a CUDA IPC handle on GPU; every tensor-parallel
   rank maps the same store and vLLM's own ``load_weights`` takes that rank's shard), checksums what it
   mapped, feeds every tensor to ``model.load_weights`` and checks that every parameter was loaded.
4. It checksums the model's parameters as this rank holds them and reports both digests to the agent
   (``POST /v1/engine/report``); the agent's ``EngineGate`` accepts or refuses. A refusal, a missing
   parameter or any error raises: vLLM exits, the container restarts, and the pod never turns Ready.
5. vLLM then post-processes the weights, sizes its KV cache and only then answers ``/health``.

So no dummy weights ever serve, no route that changes weights exists (vLLM's dev mode stays off), and
the pod holds the agent's store and vLLM's own parameters (on CPU, vLLM repacks linear weights into its
oneDNN layout after the load, so the engine's copy cannot be the agent's memory there).

This module imports vLLM only inside ``register``: the agent itself never needs vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import httpx
import torch

from seedfork_api.contract import ENV_AGENT_PORT, ENV_POD_IP, ENV_TIMEOUT_SECONDS, ENV_TOKEN

from ..checksum import checksum
from ..store import Manifest, attach_buffer, manifest_checksums, tensor_views

# A child of vLLM's own logger, so these lines land in vLLM's output with its format.
log = logging.getLogger("vllm.seedfork")

LOAD_FORMAT = "seedfork"
_registered = False


class LoadRefused(RuntimeError):
    """The engine must not serve what it has: raised out of vLLM's load, so the engine exits."""


class AgentLink:
    """The worker's line to its pod's agent (same pod: the pod IP and the agent port of the contract)."""

    def __init__(self, url: str, token: str, timeout_s: float, poll_s: float = 0.2) -> None:
        self.url, self.timeout_s, self.poll_s = url.rstrip("/"), timeout_s, poll_s
        self._headers = {"Authorization": f"Bearer {token}"}

    @classmethod
    def from_environ(cls) -> AgentLink:
        env = os.environ
        missing = [n for n in (ENV_POD_IP, ENV_AGENT_PORT, ENV_TOKEN) if not env.get(n)]
        if missing:
            raise LoadRefused(f"--load-format {LOAD_FORMAT} runs in a seedfork pod: {', '.join(missing)} unset")
        return cls(
            f"http://{env[ENV_POD_IP]}:{env[ENV_AGENT_PORT]}",
            env[ENV_TOKEN],
            float(env.get(ENV_TIMEOUT_SECONDS, "300")),
        )

    def wait_for_weights(self) -> dict[str, Any]:
        """The agent's ``/v1/attach`` answer once it offers verified weights."""
        deadline = time.monotonic() + self.timeout_s
        attempt: int | None = None
        last = "no answer yet"
        with httpx.Client(timeout=10.0) as client:
            while True:
                try:
                    r = client.get(f"{self.url}/v1/attach", headers=self._headers)
                    if r.status_code == 200:
                        return r.json()
                    if r.status_code in (401, 403):
                        raise LoadRefused(f"the agent refused the engine's token ({r.status_code})")
                    progress = client.get(f"{self.url}/v1/progress").json()
                    if progress.get("attempt") != attempt:  # a new attempt: the agent is working, wait afresh
                        attempt, deadline = progress.get("attempt"), time.monotonic() + self.timeout_s
                    last = f"agent attempt {attempt}: {progress.get('state')} {progress.get('error') or ''}".strip()
                except httpx.HTTPError as e:
                    last = f"agent unreachable: {e!r}"
                if time.monotonic() > deadline:
                    raise LoadRefused(f"no verified weights from the agent within {self.timeout_s:.0f}s ({last})")
                time.sleep(self.poll_s)

    def report(self, body: dict[str, Any]) -> None:
        r = httpx.post(f"{self.url}/v1/engine/report", json=body, headers=self._headers, timeout=30.0)
        if r.status_code != 200:
            raise LoadRefused(f"the agent refused rank {body['rank']}'s load: HTTP {r.status_code}: {r.text[:500]}")

    def failed(self, rank: int, reason: str) -> None:
        try:
            httpx.post(
                f"{self.url}/v1/engine/failed",
                json={"rank": rank, "reason": reason[:2000]},
                headers=self._headers,
                timeout=10.0,
            )
        except httpx.HTTPError:
            log.warning("could not tell the agent that rank %d failed", rank)


def params_digest(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int]:
    """Digest of parameters as one engine rank holds them: names, dtypes, shapes and byte checksums."""
    h = hashlib.sha256()
    total = 0
    for name, p in sorted(named, key=lambda kv: kv[0]):
        data = p.detach().contiguous().view(-1).view(torch.uint8)
        total += data.numel()
        h.update(json.dumps([name, str(p.dtype), list(p.shape), checksum(data)]).encode())
    return h.hexdigest(), total


def load_into(model: torch.nn.Module, link: AgentLink, rank: int, world_size: int) -> dict[str, Any]:
    """Load the agent's verified weights into ``model`` (one engine rank) and have the agent accept them."""
    started = time.time()
    try:
        body = link.wait_for_weights()
        manifest = Manifest.from_dict(body["manifest"])
        buffer = attach_buffer(body["attach"])
        # The engine's own reading of the bytes: a stale or wrong mapping shows here, not in the tokens.
        read = manifest.with_checksums(manifest_checksums(buffer, manifest))
        if read.digest != manifest.digest:
            bad = [t.name for t, s in zip(manifest.tensors, read.tensors, strict=True) if t.checksum != s.checksum]
            raise LoadRefused(f"the mapped weights differ from the manifest in {len(bad)} tensors, e.g. {bad[:3]}")
        tensors = tensor_views(buffer, manifest)
        loaded = model.load_weights(iter(tensors.items()))
        params = dict(model.named_parameters())
        if loaded is None:
            raise LoadRefused(f"{type(model).__name__}.load_weights does not say what it loaded")
        missing = sorted(set(params) - set(loaded))
        if missing:
            raise LoadRefused(f"the weights left {len(missing)} parameters unset, e.g. {missing[:5]}")
        del tensors, buffer  # the model holds its own copies: unmap the store
        digest, nbytes = params_digest(params.items())
        report = {
            "rank": rank,
            "worldSize": world_size,
            "manifestDigest": read.digest,
            "paramsDigest": digest,
            "paramBytes": nbytes,
            "loadedTensors": len(manifest.tensors),
            "startedAt": started,
        }
        link.report(report)
        log.info(
            "rank %d/%d loaded %d tensors from the agent; parameters %s",
            rank,
            world_size,
            len(manifest.tensors),
            digest[:16],
        )
        return report
    except Exception as e:
        link.failed(rank, f"{type(e).__name__}: {e}")
        raise


def _rank() -> tuple[int, int]:
    from vllm.distributed import parallel_state as ps

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pp_group()
    return pp.rank_in_group * tp + tp_rank, pp.world_size * tp


def register() -> None:
    """vLLM's plugin hook (every vLLM process calls it, maybe more than once): add ``--load-format seedfork``."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import BaseModelLoader, register_model_loader

    @register_model_loader(LOAD_FORMAT)
    class SeedforkModelLoader(BaseModelLoader):
        """Weights from the pod's seedfork agent, verified inside this engine process."""

        def download_model(self, model_config: Any) -> None:
            return None  # nothing to download: the agent brings the weights

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            rank, world_size = _rank()
            load_into(model, AgentLink.from_environ(), rank, world_size)

    _registered = True
