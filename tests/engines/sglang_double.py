"""A double of SGLang 0.5.23's HTTP server and R-Fork flag handling, for the supervisor tests.

SGLang's model forward and loaders need a GPU, so this stands in for ``sglang.launch_server``: its
``sglang/srt/entrypoints/http_server.py`` routes the agent calls, ``sglang/srt/utils/auth.py``'s
ADMIN_OPTIONAL decision, and the resolution of ``sglang/srt/arg_groups/model_path_hook.py`` for the
R-Fork flags (silent fallbacks to ``load_format auto``; the TE seed flag reset without mooncake or with
``--enable-memory-saver``). The `sglang` tier checks it against SGLang's own code
(tests/sglang/test_doubles.py): its parser accepts only flags SGLang has, its auth answers as SGLang's
``decide_request_auth``, and its replies carry the keys SGLang's handlers build. The SGLang commands the
agent renders are themselves parsed and resolved by SGLang there.

- ``GET /health``; ``GET /server_info`` and ``/get_server_info`` with the resolved args;
  ``POST /weights_checker {"action": "checksum"}`` answering ``per_engine_checksum``;
  ``GET /remote_instance_transfer_engine_info?rank=r`` with SGLang's 200 and 400 bodies; it logs
  ``server_args={...}`` as SGLang's Engine does.

- Its caches, as SGLang keeps them under ``SGLANG_CACHE_DIR`` (where ``sglang/__init__`` points Triton's):
  a "kernel" under ``triton/`` built (written with this process's id) only when it is not there yet, as a
  Triton cache hit skips the compile, and the custom all-reduce's per-node peer-to-peer probe,
  ``gpu_p2p_access_cache_for_<devices>.json``, written on every start
  (``distributed/device_communicators/custom_all_reduce_utils.py``).

What it does NOT emulate: the transfer itself. Loading "from the seed" reads the same safetensors
as the seed (``--model-path``); ``SGLANG_DOUBLE_CORRUPT=1`` flips one byte of what was "received",
standing in for a transfer that delivered wrong bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

from aiohttp import web


def parse(argv: list[str]) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", type=int, default=1)  # argparse takes "--tp" as its prefix, as SGLang does
    p.add_argument("--pp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-api-key", default=None)
    p.add_argument("--dist-init-addr", default=None)
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--remote-instance-weight-loader-seed-instance-ip", default=None)
    p.add_argument("--remote-instance-weight-loader-seed-instance-service-port", type=int, default=None)
    p.add_argument("--remote-instance-weight-loader-send-weights-group-ports", type=json.loads, default=None)
    p.add_argument(
        "--remote-instance-weight-loader-backend", choices=["transfer_engine", "nccl", "modelexpress"], default="nccl"
    )
    p.add_argument("--remote-instance-weight-loader-start-seed-via-transfer-engine", action="store_true")
    p.add_argument("--engine-info-bootstrap-port", type=int, default=6789)
    return p


def validate_transfer_engine(args: argparse.Namespace) -> bool:
    if args.enable_memory_saver:
        print("WARNING: Memory saver is enabled, which is not compatible with TransferEngine", flush=True)
        return False
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        print("WARNING: mooncake.engine cannot be imported", flush=True)
        return False
    return True


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """arg_groups/model_path_hook.py's fallbacks: warn and keep going."""
    if args.load_format == "remote_instance" and args.remote_instance_weight_loader_backend != "modelexpress":
        backend = args.remote_instance_weight_loader_backend
        if (
            args.remote_instance_weight_loader_seed_instance_ip is None
            or args.remote_instance_weight_loader_seed_instance_service_port is None
        ):
            print("WARNING: remote_instance without seed ip/port; falling back to load format auto", flush=True)
            args.load_format = "auto"
        elif backend == "nccl" and not args.remote_instance_weight_loader_send_weights_group_ports:
            print("WARNING: nccl backend without group ports; falling back to load format auto", flush=True)
            args.load_format = "auto"
        elif backend == "transfer_engine" and not validate_transfer_engine(args):
            args.load_format = "auto"
    if args.remote_instance_weight_loader_start_seed_via_transfer_engine:
        args.remote_instance_weight_loader_start_seed_via_transfer_engine = validate_transfer_engine(args)
    return args


def weights_digest(model_path: str, corrupt: bool) -> tuple[str, list[str]]:
    """A digest of the safetensors bytes, and the tensor names from their headers (no torch: starts fast)."""
    h = hashlib.sha256()
    names: list[str] = []
    for i, f in enumerate(sorted(Path(model_path).glob("*.safetensors"))):
        raw = bytearray(f.read_bytes())
        header_len = struct.unpack("<Q", raw[:8])[0]
        names += [k for k in json.loads(raw[8 : 8 + header_len]) if k != "__metadata__"]
        if corrupt and i == 0:
            raw[8 + header_len] ^= 0x01  # the first byte of tensor data
        h.update(hashlib.sha256(raw).digest())
    return h.hexdigest(), sorted(names)


NORMAL_ROUTES = ("/server_info", "/get_server_info")  # no @auth_level in http_server.py: only --api-key guards


def auth_status(path: str, authorization: str | None, api_key: str | None, admin_api_key: str | None) -> int:
    """utils/auth.py's decision for the routes this double serves (health is always open)."""
    if path.startswith(("/health", "/ready", "/metrics")):
        return 200
    key = api_key if path in NORMAL_ROUTES else admin_api_key or api_key
    if not key:
        return 200
    scheme, _, value = (authorization or "").partition(" ")
    return 200 if scheme.lower() == "bearer" and value == key else 401


def weights_checker_reply(digest: str, tp: int) -> dict:
    """``/weights_checker`` checksum: per rank a checksum, ``per_engine_checksum`` the sha256 over them."""
    ranks = [{"tp_rank": r, "per_gpu_checksum": digest} for r in range(tp)]
    engine = hashlib.sha256()
    for r in ranks:
        engine.update(r["per_gpu_checksum"].encode())
    return {"success": True, "message": "", "ranks": ranks, "per_engine_checksum": engine.hexdigest()}


def compile_into_cache(root: str | None) -> None:
    if not root:
        return
    kernel = Path(root, "triton", "double-kernel", "kernel.cubin")
    if not kernel.exists():  # a cache hit: nothing compiled
        kernel.parent.mkdir(parents=True, exist_ok=True)
        kernel.write_text(f"compiled by {os.getpid()}\n")
    Path(root, "gpu_p2p_access_cache_for_0.json").write_text(json.dumps({"0->0": True, "probed_by": os.getpid()}))


def main() -> None:
    args = resolve(parse(sys.argv[1:]))
    print(f"server_args={vars(args)}", flush=True)  # as SGLang's Engine logs its resolved args
    remote = args.load_format == "remote_instance"
    digest, names = weights_digest(args.model_path, remote and os.environ.get("SGLANG_DOUBLE_CORRUPT") == "1")
    compile_into_cache(os.environ.get("SGLANG_CACHE_DIR"))

    @web.middleware
    async def auth(request, handler):
        # SGLANG_DOUBLE_CONFIG_ADMIN_KEY: a key SGLang read from a --config file, which the agent cannot see.
        admin = os.environ.get("SGLANG_DOUBLE_CONFIG_ADMIN_KEY") or args.admin_api_key
        status = auth_status(request.path, request.headers.get("Authorization"), args.api_key, admin)
        if status != 200:
            return web.json_response({"error": "Unauthorized"}, status=status)
        return await handler(request)

    async def health(_):
        return web.Response(text="")

    async def server_info(_):
        return web.json_response(vars(args))

    async def weights_checker(request):
        body = await request.json()
        if body.get("action") != "checksum":
            return web.json_response({"success": False, "message": "unsupported action"}, status=400)
        return web.json_response(weights_checker_reply(digest, args.tp_size))

    async def te_info(request):
        try:
            rank = int(request.query["rank"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "Missing or invalid rank parameter"}}, status=400)
        if not args.remote_instance_weight_loader_start_seed_via_transfer_engine or rank >= args.tp_size:
            msg = f"Failed to get transfer engine info for rank {rank}"
            return web.json_response({"error": {"message": msg}}, status=400)
        session = f"{os.environ.get('SGLANG_HOST_IP', args.host)}:15575"
        info = {n: [140230000000000 + i * 4096, 1024, 2] for i, n in enumerate(names)}
        return web.json_response({"rank": rank, "remote_instance_transfer_engine_info": [session, info]})

    app = web.Application(middlewares=[auth])
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/server_info", server_info),
            web.get("/get_server_info", server_info),
            web.post("/weights_checker", weights_checker),
            web.get("/remote_instance_transfer_engine_info", te_info),
            web.get("/get_remote_instance_transfer_engine_info", te_info),
        ]
    )
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
