"""seedfork's reference engine: a small Llama-architecture model behind an HTTP API, for demos and tests.

It is a real engine (it generates), not a production one. It gets its weights one of three ways:

- ``--agent URL``: **attach** to the agent's weight store without copying (the /dev/shm file on CPU,
  a CUDA IPC handle on GPU), as soon as the agent offers it on ``GET /v1/attach`` (only after it verified
  the weights). It re-checks every tensor's checksum against the manifest before serving. Where the
  agent's gate waits for the engine's proof (a pod's agent: the answer names a ``layout``), the engine
  reports what it checked (``POST /v1/engine/report``, ``engines.gate``); a check that fails, or a proof
  the agent refuses, ends the process so that its container restarts (never a wedged engine).
- ``--ipc``: start with empty weights and wait for the checkpoint-engine IPC handoff
  (``POST /update_weights_from_ipc``, as SGLang takes it).
- ``--model DIR``: load the safetensors files directly (storage; the baseline to compare against).

``/health`` answers 503 until the weights are in place, except in a warm standby (the agent answered
``standby``): its API is up and it stays up through its promotion, since the readiness gate waits for its
proof anyway; a pod turns Ready when the gate does, not one probe period later. Routes: ``GET /health``,
``GET /v1/engine``, ``POST /generate`` (token ids or text as bytes), ``POST /weights_checker``
(``{"action": "checksum"}``), and the IPC trigger. Everything but ``/health`` needs the bearer token when one is set.

CLI::

    python -m seedfork_agent.engines.reference make-model --out DIR --size tiny|small
    python -m seedfork_agent.engines.reference serve --config DIR --agent http://IP:PORT --token T --host IP --port P
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import torch
from aiohttp import web

from .. import store as weight_store
from ..checksum import checksum, warm_up
from ..plainhttp import verify
from . import ipc
from .gate import STANDBY
from .llama import LlamaConfig, LlamaModel, weight_shapes

log = logging.getLogger("seedfork.reference")
ATTACH_WAIT_S = 5.0  # how long the agent may hold one ask for the weights (its /v1/attach?wait=)


def weights_checksums(weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Per-tensor checksums of the raw bytes (the agent's checksum, so they compare with the manifest)."""
    return {name: checksum(t.contiguous().reshape(-1).view(torch.uint8)) for name, t in sorted(weights.items())}


def process_start() -> float | None:
    """When this process started (epoch seconds), before its imports: from Linux's /proc (its start and the
    uptime count from the same boot, in clock ticks and hundredths of a second), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def engine_checksum(per_tensor: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}={per_tensor[name]};".encode())
    return h.hexdigest()


class ReferenceEngine:
    def __init__(self, config: LlamaConfig, device: str = "cpu", token: str | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.token = token
        self.model: LlamaModel | None = None
        self.state = "waiting"  # waiting -> ready | failed
        self.warm = False  # a warm standby, or its promotion: /health passes without weights (the gate decides)
        self.error: str | None = None
        self.mode = "none"
        self.attach_info: dict | None = None
        self.timings: dict[str, float] = {}
        # Epoch seconds of the startup phases, published in /v1/engine for the pod's timing: process start,
        # API up (warm, no weights: where a standby waits), weights attached, weights re-checked (serving).
        self.phases: dict[str, float] = {k: v for k, v in {"started": process_start()}.items() if v is not None}
        self._lock = asyncio.Lock()

    # ---- warm-up ----------------------------------------------------------------------------
    def warm_compute(self) -> None:
        """A GPU's first forward pays for cuBLAS's handles and the kernels' loading (tenths of a second): pay it
        while waiting for the weights, on scratch weights of one layer (every matrix shape the model has, a
        fraction of its memory), so a pod's first request does not. Nothing of it is kept or served: the
        scratch model is dropped and its memory handed back before the engine reports itself up. (On a CPU a
        first forward costs about what the next does: ``serve`` calls this on a GPU only.)"""
        t0 = time.perf_counter()
        config = dataclasses.replace(self.config, num_hidden_layers=1)
        scratch = {n: torch.zeros(s, dtype=config.dtype, device=self.device) for n, s in weight_shapes(config).items()}
        LlamaModel(config, scratch).generate([0], 1)
        del scratch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.timings["warm_compute_ms"] = (time.perf_counter() - t0) * 1000

    # ---- weights ----------------------------------------------------------------------------
    def use_weights(self, weights: Mapping[str, torch.Tensor], mode: str) -> None:
        self.model = LlamaModel(self.config, weights)  # checks names, shapes and dtypes
        self.mode = mode
        self.state, self.error = "ready", None

    def attach(self, body: dict, verify: bool = True) -> tuple[weight_store.Manifest, dict[str, str] | None]:
        """Map the agent's store (zero-copy) and, unless told not to, re-check every checksum; returns the
        offered manifest and the checksums the engine computed itself (None unchecked)."""
        manifest = weight_store.Manifest.from_dict(body["manifest"])
        t0 = time.perf_counter()
        buffer = weight_store.attach_buffer(body["attach"])
        weights = weight_store.tensor_views(buffer, manifest)
        self.timings["attach_ms"] = (time.perf_counter() - t0) * 1000
        got = None
        if verify:
            t1 = time.perf_counter()
            got = weight_store.manifest_checksums(buffer, manifest)
            bad = [t.name for t in manifest.tensors if got[t.name] != t.checksum]
            self.timings["verify_ms"] = (time.perf_counter() - t1) * 1000
            if bad:
                raise ValueError(f"checksum mismatch in {len(bad)} tensor(s): {', '.join(bad[:5])}")
        self.attach_info = {k: v for k, v in body["attach"].items() if k in ("kind", "path", "nbytes", "device")}
        self.phases["attached"] = time.time() - self.timings.get("verify_ms", 0.0) / 1000
        self.use_weights(weights, "attach")
        self.phases["verified"] = time.time()
        return manifest, got

    def proof(self, manifest: weight_store.Manifest, got: Mapping[str, str], asked_at: float) -> dict:
        """The gate's report of one rank (``engines.gate.RankReport``): the offered manifest's digest with the
        checksums this engine computed, so it equals the agent's only when every byte it maps does."""
        return {
            "rank": 0,
            "worldSize": 1,
            "manifestDigest": manifest.with_checksums(dict(got)).digest,
            "paramsDigest": engine_checksum(got),
            "paramBytes": manifest.payload_bytes,
            "loadedTensors": len(manifest.tensors),
            "startedAt": asked_at,
            "privateBytes": 0,  # views of the agent's store: no copy of its own
        }

    def load_dir(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            weights |= load_file(str(path), device=str(self.device))
        self.use_weights(weights, "storage")

    def receive_ipc(self, handles: Mapping[str, str]) -> None:
        """Engine side of the checkpoint-engine handoff: copy each bucket into our own tensors."""
        me = ipc.device_uuid(self.device)
        if me not in handles:
            raise ValueError(f"no ZMQ handle for this device {me}; got {sorted(handles)}")
        shapes = weight_shapes(self.config)
        staged = {n: torch.empty(s, dtype=self.config.dtype, device=self.device) for n, s in shapes.items()}
        seen: set[str] = set()

        def load(views: list[tuple[str, torch.Tensor]]) -> None:
            for name, view in views:
                if name not in staged:
                    raise KeyError(f"unknown weight {name}")
                if view.shape != staged[name].shape or view.dtype != staged[name].dtype:
                    raise ValueError(f"{name}: got {view.dtype} {tuple(view.shape)}, want {staged[name].dtype}")
                staged[name].copy_(view)  # the buffer is reused for the next bucket
                seen.add(name)

        def post_hook() -> None:
            missing = sorted(set(staged) - seen)
            if missing and self.model is None:
                raise ValueError(f"update left {len(missing)} weight(s) unset, e.g. {missing[0]}")

        ipc.receive_weights(handles[me], load, post_hook, self.device)
        if self.model is not None:  # a later update: only the names sent change
            merged = dict(self.model.w)
            for name in seen:
                merged[name] = staged[name]
            staged = merged
        elif seen != set(staged):
            raise ValueError(f"initial update sent {len(seen)} of {len(staged)} weights")
        self.use_weights(staged, "ipc")

    # ---- HTTP -------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode())

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if request.path != "/health" and not self._authorized(request):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    async def health(self, _request: web.Request) -> web.Response:
        if self.state == "ready" or (self.warm and self.state != "failed"):
            return web.Response(text="ok")
        return web.Response(text=self.error or "weights not attached", status=503)

    async def info(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "state": self.state,
                "mode": self.mode,
                "error": self.error,
                "device": str(self.device),
                "attach": self.attach_info,
                "timings": self.timings,
                "phases": self.phases,
                "deviceUUID": ipc.device_uuid(self.device),
            }
        )

    async def generate(self, request: web.Request) -> web.Response:
        if self.model is None:
            return web.json_response({"error": "weights not attached"}, status=503)
        body = await self._body(request)
        try:
            params = body.get("sampling_params") or {}
            max_new = int(params.get("max_new_tokens", body.get("max_new_tokens", 16)))
            if "input_ids" in body:
                prompt = [int(t) for t in body["input_ids"]]
            elif "text" in body:
                if self.config.vocab_size < 256:
                    raise ValueError("text needs a byte vocabulary (vocab_size >= 256)")
                prompt = list(str(body["text"]).encode())
            else:
                raise ValueError("give input_ids or text")
            if max_new < 0 or max_new > 4096:
                raise ValueError("max_new_tokens must lie in [0, 4096]")
        except (ValueError, TypeError, KeyError) as e:
            return web.json_response({"error": str(e)}, status=400)
        model = self.model
        try:
            async with self._lock:
                out = await asyncio.to_thread(model.generate, prompt, max_new)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        text = bytes(t for t in out if t < 256).decode(errors="replace")
        return web.json_response({"output_ids": out, "text": text, "meta_info": {"prompt_tokens": len(prompt)}})

    async def weights_checker(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("action") != "checksum":
            return web.json_response({"success": False, "message": "only action 'checksum' is supported"}, status=400)
        if self.model is None:
            return web.json_response({"success": False, "message": "weights not attached"}, status=503)
        model = self.model
        async with self._lock:
            per_tensor = await asyncio.to_thread(weights_checksums, model.w)
        return web.json_response(
            {"success": True, "per_engine_checksum": [engine_checksum(per_tensor)], "per_tensor_checksum": per_tensor}
        )

    async def _ipc(self, handles: Mapping[str, str]) -> web.Response:
        t0 = time.perf_counter()
        async with self._lock:
            try:
                await asyncio.to_thread(self.receive_ipc, handles)
            except Exception as e:
                log.warning("IPC weight update failed: %s", e)
                return web.json_response({"success": False, "message": str(e)}, status=400)
        self.timings["ipc_ms"] = (time.perf_counter() - t0) * 1000
        return web.json_response({"success": True, "message": "weights updated"})

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def update_weights_from_ipc(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        handles = body.get("zmq_handles")
        if not isinstance(handles, dict):
            return web.json_response({"success": False, "message": "zmq_handles must be an object"}, status=400)
        return await self._ipc(handles)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=1 << 20)
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/engine", self.info),
                web.post("/generate", self.generate),
                web.post("/weights_checker", self.weights_checker),
                web.post("/update_weights_from_ipc", self.update_weights_from_ipc),
            ]
        )
        return app


class EngineExit(RuntimeError):
    """The engine cannot serve what its agent offered: the process ends and its container restarts."""


async def _offered(engine: ReferenceEngine, client: httpx.AsyncClient, url: str, poll_s: float) -> dict | None:
    """The agent's next offer of a store (None when it refused the token). The agent holds each ask until its
    answer changes (``wait``); a ``standby`` answer makes the engine warm, and it asks again."""
    while True:
        try:
            r = await client.get(f"{url}/v1/attach", params={"wait": ATTACH_WAIT_S})
        except httpx.HTTPError:
            await asyncio.sleep(poll_s)  # the agent is not up yet
            continue
        if r.status_code in (401, 403):
            engine.state, engine.error = "failed", f"agent refused the token ({r.status_code})"
            return None
        body = r.json() if r.status_code == 200 else {}
        if body.get("layout") == STANDBY:
            engine.warm = True
        elif r.status_code == 200:
            return body
        elif r.status_code != 503:  # 503: the agent held the ask until its answer changed; ask again now
            await asyncio.sleep(poll_s)


async def attach_when_verified(engine: ReferenceEngine, agent_url: str, token: str, poll_s: float = 0.1) -> None:
    """Attach the store the agent offers once it verified it, re-check every tensor, and (where the agent's gate
    waits for it: the offer names a ``layout``) prove it to the agent. Without a gate a failed check leaves the
    engine answering 503 with the reason; with one the agent is told and ``EngineExit`` is raised."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=ATTACH_WAIT_S + 10, headers=headers, verify=verify(agent_url)) as client:
        body = await _offered(engine, client, agent_url, poll_s)
        if body is None:
            return
        gated, asked_at = "layout" in body, time.time()
        try:
            manifest, got = await asyncio.to_thread(engine.attach, body, True)
        except Exception as e:
            engine.state, engine.error = "failed", f"attach failed: {e}"
            log.error("%s", engine.error)
            if gated:
                await _tell(client, f"{agent_url}/v1/engine/failed", {"rank": 0, "reason": engine.error[:2000]})
                raise EngineExit(engine.error) from e
            return
        log.info("attached to the agent's weights (%s) in %.1f ms", engine.attach_info, engine.timings["attach_ms"])
        if gated:
            proof = engine.proof(manifest, got, asked_at)
            r = await _tell(client, f"{agent_url}/v1/engine/report", proof)
            if r is None or r.status_code != 200:
                engine.model, engine.state = None, "failed"  # never serve what the agent did not accept
                engine.error = f"the agent refused the engine's proof: {r.text[:500] if r is not None else 'no answer'}"
                raise EngineExit(engine.error)


async def _tell(client: httpx.AsyncClient, url: str, body: dict) -> httpx.Response | None:
    try:
        return await client.post(url, json=body)
    except httpx.HTTPError as e:
        log.warning("could not reach the agent at %s: %r", url, e)
        return None


async def serve(args: argparse.Namespace) -> int:
    config = LlamaConfig.load(args.config or args.model)
    engine = ReferenceEngine(config, args.device, args.token)
    if args.model and not args.agent:
        engine.load_dir(args.model)
    runner = web.AppRunner(engine.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("reference engine on http://%s:%d", args.host, args.port)
    if args.agent and engine.device.type == "cuda":
        await asyncio.to_thread(warm_up, engine.device)  # compile the checksum kernel while weights move
        await asyncio.to_thread(engine.warm_compute)
    engine.phases["up"] = time.time()  # initialised and warm: what a standby waits in
    if args.agent:
        try:
            await attach_when_verified(engine, args.agent.rstrip("/"), args.token)
        except EngineExit as e:
            log.error("exiting so that the engine restarts: %s", e)
            await runner.cleanup()
            return 1
    await asyncio.Event().wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    from .testmodel import SIZES, make_model

    parser = argparse.ArgumentParser(
        prog="python -m seedfork_agent.engines.reference", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model", help="write a deterministic test model (config.json + safetensors)")
    mk.add_argument("--out", required=True)
    mk.add_argument("--size", choices=sorted(SIZES), default="tiny")
    sv = sub.add_parser("serve", help="run the engine")
    sv.add_argument("--config", help="config.json or a model directory holding one")
    src = sv.add_mutually_exclusive_group(required=True)
    src.add_argument("--agent", help="attach to this agent's weight store, e.g. http://10.0.0.5:18080")
    src.add_argument("--ipc", action="store_true", help="wait for the checkpoint-engine IPC handoff")
    src.add_argument("--model", help="load safetensors from this directory (storage)")
    sv.add_argument("--token", default=os.environ.get("SEEDFORK_TOKEN"), help="bearer token (default $SEEDFORK_TOKEN)")
    sv.add_argument("--host", required=True, help="the pod IP to bind (never 0.0.0.0)")
    sv.add_argument("--port", type=int, default=30000)
    sv.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "make-model":
        print(make_model(args.out, args.size))
        return 0
    if args.host in ("0.0.0.0", "::"):
        parser.error("bind to the pod IP, not a wildcard address")
    if not (args.config or args.model):
        parser.error("--config is required unless --model gives the directory")
    if args.agent and not args.token:
        parser.error("--agent needs --token (or $SEEDFORK_TOKEN)")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
