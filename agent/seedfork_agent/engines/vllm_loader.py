"""seedfork's model loader for vLLM (``--load-format seedfork``): the weights come from the pod's agent.

It runs inside vLLM's worker processes, registered through vLLM's plugin entry point
(``vllm.general_plugins``: ``seedfork = seedfork_agent.engines.vllm_loader:register``), and takes the
place of vLLM's own weight loading during vLLM's own start-up:

1. vLLM builds the model (its parameters allocated, nothing loaded).
2. Each worker asks the agent for the store (``GET /v1/attach``, the set's token) and waits until the
   agent offers verified weights: from storage for the first replica, from a seed for the others. The
   wait is bounded by the set's timeout, counted afresh whenever the agent starts a new attempt (a retry
   from another seed or storage), so an agent that fails or stops answering ends it within that bound.
3. The pod keeps one copy of the weights, and it is the engine's (``engine_store``, ``gate``):
   - a **checkpoint** store (loaded from storage): the worker maps it, checksums what it mapped, feeds
     every tensor to vLLM's own ``model.load_weights`` (each tensor-parallel rank takes its shard),
     checks that every parameter was loaded and reports its parameters' layout. The agent frees the
     checkpoint and offers an empty engine-layout store; the worker copies its parameters in and makes
     them views of that shared memory.
   - an **engine-layout** store (pulled from a seed, or this pod's own after an engine restart): the
     worker checksums its rank's part and makes its parameters views of it, without a load or a copy.
   It keeps vLLM's CPU build from repacking the linear weights into oneDNN's layout (vLLM's own
   ``_cpu_skip_gemm_dispatch`` path): a repacked weight is a second, private copy the agent cannot
   serve. The README says what that costs.
4. After vLLM's post-processing, it checks that the parameters still are the store's memory, checksums
   them as this rank holds them and reports the digest to the agent (``POST /v1/engine/report``); the
   agent's ``EngineGate`` accepts or refuses. A refusal, a missing parameter or any error raises: vLLM
   exits, the container restarts, and the pod never turns Ready.
5. vLLM then sizes its KV cache and only then answers ``/health``.

So no dummy weights ever serve, no route that changes weights exists (vLLM's dev mode stays off), and
what a seed serves is its engine's own parameters.

This module imports vLLM only inside functions called in vLLM's processes: the agent never needs vLLM.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from seedfork_api.contract import EngineEnv

from ..checksum import checksum
from ..plainhttp import verify
from ..store import Manifest, attach_buffer, dtype_name, manifest_checksums, tensor_views
from .engine_store import params_digest, rank_entries, rank_prefix
from .gate import CHECKPOINT, ENGINE, FILL, STANDBY

# A child of vLLM's own logger, so these lines land in vLLM's output with its format.
log = logging.getLogger("vllm.seedfork")

LOAD_FORMAT = "seedfork"
_registered = False


ATTACH_WAIT_S = 2.0  # how long the agent may hold one ask for the weights (its /v1/attach?wait=)


class LoadRefused(RuntimeError):
    """The engine must not serve what it has: raised out of vLLM's load, so the engine exits."""


class AgentLink:
    """The worker's line to its pod's agent (same pod: the pod IP and the agent port of the contract)."""

    def __init__(self, url: str, token: str, timeout_s: float, poll_s: float = 0.2) -> None:
        self.url, self.timeout_s, self.poll_s = url.rstrip("/"), timeout_s, poll_s
        self._headers = {"Authorization": f"Bearer {token}"}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AgentLink:
        try:
            env = EngineEnv.from_environ(environ, required=("pod_ip", "agent_port", "token"))
        except ValueError as e:
            raise LoadRefused(f"--load-format {LOAD_FORMAT} runs in a seedfork pod: {e}") from None
        return cls(f"http://{env.pod_ip}:{env.agent_port}", env.token, env.timeout_seconds)

    def wait_for_weights(
        self, accept: tuple[str, ...], attempt: int | None = None, refuse: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The agent's ``/v1/attach`` answer once it offers a store of a kind in ``accept``; a store of a kind
        in ``refuse`` ends the wait at once (``LoadRefused``: the agent waits for this engine, which cannot take
        it). With ``attempt`` (the second step of a load), the store must belong to that attempt: if the agent
        left it, so does the engine. While the agent holds the pod as a warm standby (and standby is not
        accepted), the wait has no bound: a standby waits for its promotion, whose own attempt is bounded."""
        deadline = time.monotonic() + self.timeout_s
        seen, last = attempt, "no answer yet"
        with httpx.Client(timeout=ATTACH_WAIT_S + 10.0, verify=verify(self.url)) as client:
            while True:
                try:
                    # The agent holds the ask until its answer changes (or ATTACH_WAIT_S): no poll's delay.
                    r = client.get(f"{self.url}/v1/attach", params={"wait": ATTACH_WAIT_S}, headers=self._headers)
                    if r.status_code in (401, 403):
                        raise LoadRefused(f"the agent refused the engine's token ({r.status_code})")
                    body = r.json() if r.status_code == 200 else {}
                    if body.get("layout") in accept and (attempt is None or body.get("attempt") == attempt):
                        return body
                    if body.get("layout") in refuse:
                        raise LoadRefused(f"the agent offers a {body['layout']} store, which this engine cannot take")
                    if body.get("layout") == STANDBY:
                        deadline = time.monotonic() + self.timeout_s
                    progress = client.get(f"{self.url}/v1/progress").json()
                    now = progress.get("attempt")
                    if attempt is not None and now != attempt:
                        raise LoadRefused(f"the agent left attempt {attempt} for {now}: {progress.get('error')}")
                    if now != seen:  # a new attempt: the agent is working, wait afresh
                        seen, deadline = now, time.monotonic() + self.timeout_s
                    last = f"agent attempt {now}: {progress.get('state')} {progress.get('error') or ''}".strip()
                except httpx.HTTPError as e:
                    last = f"agent unreachable: {e!r}"
                if time.monotonic() > deadline:
                    raise LoadRefused(f"no verified weights from the agent within {self.timeout_s:.0f}s ({last})")
                time.sleep(self.poll_s)

    def _post(self, path: str, body: dict[str, Any]) -> None:
        r = httpx.post(f"{self.url}{path}", json=body, headers=self._headers, timeout=30.0, verify=verify(self.url))
        if r.status_code != 200:
            raise LoadRefused(f"the agent refused rank {body['rank']}'s load: HTTP {r.status_code}: {r.text[:500]}")

    def layout(self, body: dict[str, Any]) -> None:
        self._post("/v1/engine/layout", body)

    def report(self, body: dict[str, Any]) -> None:
        self._post("/v1/engine/report", body)

    def failed(self, rank: int, reason: str) -> None:
        try:
            httpx.post(
                f"{self.url}/v1/engine/failed",
                json={"rank": rank, "reason": reason[:2000]},
                headers=self._headers,
                timeout=10.0,
                verify=verify(self.url),
            )
        except httpx.HTTPError:
            log.warning("could not tell the agent that rank %d failed", rank)


@dataclass
class Binding:
    """The store this rank's parameters are views of, from ``load_into`` to the report."""

    buffer: torch.Tensor
    manifest: Manifest
    manifest_digest: str  # what the rank reports it read: the offered manifest, checksummed here
    loaded_tensors: int
    started_at: float


def _held(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _load_checkpoint(model: torch.nn.Module, body: dict[str, Any]) -> tuple[str, int]:
    """vLLM's own ``load_weights`` from a checkpoint store; returns the digest read and the tensors fed."""
    manifest = Manifest.from_dict(body["manifest"])
    buffer = attach_buffer(body["attach"])
    # The engine's own reading of the bytes: a stale or wrong mapping shows here, not in the tokens.
    read = manifest.with_checksums(manifest_checksums(buffer, manifest))
    if read.digest != manifest.digest:
        bad = [t.name for t, s in zip(manifest.tensors, read.tensors, strict=True) if t.checksum != s.checksum]
        raise LoadRefused(f"the mapped weights differ from the manifest in {len(bad)} tensors, e.g. {bad[:3]}")
    tensors = tensor_views(buffer, manifest)
    loaded = model.load_weights(iter(tensors.items()))
    if loaded is None:
        raise LoadRefused(f"{type(model).__name__}.load_weights does not say what it loaded")
    missing = sorted(set(_held(model)) - set(loaded))
    if missing:
        raise LoadRefused(f"the weights left {len(missing)} parameters unset, e.g. {missing[:5]}")
    del tensors, buffer  # the parameters hold the shard now: unmap the checkpoint, which the agent frees
    gc.collect()
    return read.digest, len(manifest.tensors)


def _bind(model: torch.nn.Module, body: dict[str, Any], rank: int, fill: bool) -> tuple[torch.Tensor, Manifest]:
    """Make this rank's parameters views of the offered engine-layout store: copied in first (``fill``), or
    checksummed as they are (the seed's bytes, or this pod's own)."""
    manifest = Manifest.from_dict(body["manifest"])
    buffer = attach_buffer(body["attach"])
    views = tensor_views(buffer, manifest)
    entries, params = rank_entries(manifest, rank), _held(model)
    if set(entries) != set(params):
        extra, missing = sorted(set(entries) - set(params)), sorted(set(params) - set(entries))
        raise LoadRefused(f"the store's rank {rank} does not fit this engine: extra {extra[:3]}, missing {missing[:3]}")
    for name, p in params.items():
        view = views[rank_prefix(rank) + name]
        if view.dtype != p.dtype or view.shape != p.shape:
            held = f"{view.dtype} {tuple(view.shape)}"
            raise LoadRefused(f"{name}: the store holds {held}, the engine {p.dtype} {tuple(p.shape)}")
        if not fill and checksum(view.reshape(-1).view(torch.uint8)) != entries[name].checksum:
            raise LoadRefused(f"{name}: the mapped bytes differ from the manifest")
        if p.device != view.device:
            # A GPU engine beside an agent that sees no GPU (vLLM's CUDA build: on paper, it cannot run here):
            # the parameters stay the engine's one device copy; the store is their copy in host memory.
            if fill:
                view.copy_(p.data)
            else:
                p.data.copy_(view)
            continue
        if fill:
            view.copy_(p.data)
        p.data = view  # the private copy goes; the tie of tied parameters stays (one Parameter object)
    gc.collect()
    return buffer, manifest


def keep_weights_in_place(model: torch.nn.Module) -> None:
    """Before vLLM's post-processing: on CPU, leave unquantized linear weights as they are (vLLM's own
    ``_cpu_skip_gemm_dispatch``), not repacked into a private oneDNN copy. Ignored off CPU."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
            module._cpu_skip_gemm_dispatch = True


def drop_packed_copies(model: torch.nn.Module) -> None:
    """After vLLM's post-processing: an embedding-like layer keeps its weight and may add a packed copy for
    its GEMM (``cpu_linear``, CPU only); compute from the weight itself so the copy is freed."""
    for module in model.modules():
        fn, weight = getattr(module, "cpu_linear", None), getattr(module, "weight", None)
        if fn is not None and fn is not torch.nn.functional.linear and weight is not None and weight.numel():
            module.cpu_linear = torch.nn.functional.linear


def load_into(model: torch.nn.Module, link: AgentLink, rank: int, world_size: int) -> Binding | None:
    """Give ``model`` (one engine rank) the agent's verified weights, its parameters the pod's one store;
    None for a warm standby (no weights yet: ``await_promotion`` brings them)."""
    started = time.time()
    body = link.wait_for_weights((CHECKPOINT, ENGINE, STANDBY))
    if body["layout"] == STANDBY:
        return None
    if body["layout"] == CHECKPOINT:
        read, fed = _load_checkpoint(model, body)
        held = _held(model)
        link.layout(
            {
                "rank": rank,
                "worldSize": world_size,
                "manifestDigest": read,
                "tensors": [[n, dtype_name(p.dtype), list(p.shape)] for n, p in held.items()],
            }
        )
        buffer, manifest = _bind(model, link.wait_for_weights((FILL,), body["attempt"]), rank, fill=True)
        return Binding(buffer, manifest, manifest.digest, fed, started)
    return _map(model, body, rank, started)


def _map(model: torch.nn.Module, body: dict[str, Any], rank: int, started: float) -> Binding:
    buffer, manifest = _bind(model, body, rank, fill=False)
    return Binding(buffer, manifest, manifest.digest, len(rank_entries(manifest, rank)), started)


def await_promotion(model: torch.nn.Module, link: AgentLink, rank: int, world_size: int) -> None:
    """A warm standby's rank, in a thread of the running engine: once the agent offers the promoted pod's
    store, make the parameters views of it and prove them. vLLM's guard (``vllm_guard``) has refused every
    request meanwhile. Any failure ends the engine's process: vLLM shuts down and its container restarts,
    so no engine stays up with weights it could not prove. A store from storage (a checkpoint, after every
    seed failed) is such a failure: only vLLM's own loader takes a checkpoint, so the engine restarts (at
    once, not after the set's timeout) and the next attempt's new vLLM loads it."""
    try:
        body = link.wait_for_weights((ENGINE,), refuse=(CHECKPOINT, FILL))
        prove(model, _map(model, body, rank, time.time()), link, rank, world_size)
    except Exception as e:
        log.error("rank %d could not take its promotion's weights: %s", rank, e)
        link.failed(rank, f"{type(e).__name__}: {e}")
        os.kill(os.getpid(), signal.SIGKILL)


def prove(model: torch.nn.Module, binding: Binding, link: AgentLink, rank: int, world_size: int) -> dict[str, Any]:
    """After vLLM's post-processing: checksum the parameters as this rank holds them, count what lies
    outside the store, and have the agent accept them."""
    lo = binding.buffer.data_ptr()
    hi = lo + binding.buffer.numel()
    items, nbytes, private = [], 0, 0
    for name, p in _held(model).items():
        data = p.detach().reshape(-1).view(torch.uint8)
        nbytes += data.numel()
        outside = not lo <= p.data_ptr() < hi or p.data_ptr() + data.numel() > hi
        if outside and p.device == binding.buffer.device:  # a second copy in the memory the store is in
            private += data.numel()
        items.append((name, dtype_name(p.dtype), list(p.shape), checksum(data)))
    for module in model.modules():  # a packed copy left behind by the post-processing
        if getattr(module, "cpu_linear", torch.nn.functional.linear) is not torch.nn.functional.linear:
            private += module.weight.numel() * module.weight.element_size() if hasattr(module, "weight") else 0
    digest = params_digest(items)
    report = {
        "rank": rank,
        "worldSize": world_size,
        "manifestDigest": binding.manifest_digest,
        "paramsDigest": digest,
        "paramBytes": nbytes,
        "privateBytes": private,
        "loadedTensors": binding.loaded_tensors,
        "startedAt": binding.started_at,
    }
    link.report(report)
    log.info(
        "rank %d/%d holds %d parameter bytes in the pod's store (%d outside); parameters %s",
        rank,
        world_size,
        nbytes,
        private,
        digest[:16],
    )
    return report


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
        """Weights from the pod's seedfork agent, verified inside this engine process, held once."""

        def download_model(self, model_config: Any) -> None:
            return None  # nothing to download: the agent brings the weights

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            self._binding = load_into(model, self._link, *self._rank)
            keep_weights_in_place(model)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
            self._link, self._rank = AgentLink.from_environ(), _rank()
            try:
                model = super().load_model(vllm_config, model_config, prefix)
                drop_packed_copies(model)
                if self._binding is None:  # a warm standby: vLLM warms up now; the weights come on promotion
                    threading.Thread(
                        target=await_promotion, args=(model, self._link, *self._rank), daemon=True
                    ).start()
                else:
                    prove(model, self._binding, self._link, *self._rank)
            except Exception as e:
                self._link.failed(self._rank[0], f"{type(e).__name__}: {e}")
                raise
            return model

    _registered = True
