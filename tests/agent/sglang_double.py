"""Doubles of SGLang 0.5.23's R-Fork client and seed wire protocol, for seedfork's own agents.

They stand for ``sglang/srt/model_loader/remote_instance_weight_loader_utils.py`` (the client's init and
send requests, its TransferEngine info request), ``sglang/srt/connector/remote_instance.py`` and
``sglang/srt/utils/common.py:init_custom_process_group`` (the group join), and the seed's R-Fork routes
of ``sglang/srt/entrypoints/http_server.py``. SGLang's model and loaders need a GPU, so the "model" is
the safetensors set in checkpoint order; a stock SGLang moves its own fused, sharded parameters instead,
which is why stock SGLang does not interoperate with seedfork (docs/sglang.md, "Stock SGLang"). Their
request bodies are checked against io_struct's models by the `sglang` tier (tests/sglang/test_doubles.py);
unlike stock SGLang, the client sends the set's token. On CPU the "nccl" backend runs over gloo.

    python sglang_double.py client SEED_IP SEED_PORT CLIENT_IP GROUP_PORT WEIGHTS_DIR OUT_DIR TOKEN
    python sglang_double.py seed IP PORT WEIGHTS_DIR
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import timedelta
from pathlib import Path

import requests
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed import PrefixStore
from torch.distributed.distributed_c10d import _new_process_group_helper, _world
from torch.distributed.rendezvous import rendezvous


def named_parameters(weights_dir: str, empty: bool) -> list[tuple[str, torch.Tensor]]:
    out = []
    for path in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                out.append((name, torch.zeros_like(t) if empty else t.contiguous()))
    return out


def init_custom_process_group(init_method: str, world_size: int, rank: int, group_name: str, backend: str = "gloo"):
    """sglang/srt/utils/common.py:init_custom_process_group, with a 60 s timeout instead of 30 min."""
    timeout = timedelta(seconds=60)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefix_store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], backend, prefix_store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


# ---- client ---------------------------------------------------------------------------------------------------
def rfork_bodies(seed_ip: str, client_ip: str, ports: list[int]) -> tuple[dict, dict]:
    """The init and send bodies SGLang's client POSTs (remote_instance_weight_loader_utils.py)."""
    group_name = f"send_weights_{client_ip}"
    joined = ",".join(str(p) for p in ports)
    init = {"master_address": seed_ip, "ports": joined, "group_rank": 0, "world_size": 2, "group_name": group_name,
            "backend": "nccl"}  # fmt: skip
    return init, {"master_address": seed_ip, "ports": joined, "group_name": group_name}


def client(seed_ip, seed_port, client_ip, group_port, weights_dir, out_dir, token):
    base = f"http://{seed_ip}:{seed_port}"
    # SGLang's own client sends no Authorization header; our seed requires one, so this double adds it.
    headers = {"Authorization": f"Bearer {token}"}
    params = named_parameters(weights_dir, empty=True)

    # NCCL backend.
    init_body, send_body = rfork_bodies(seed_ip, client_ip, [group_port])
    results = {}
    t = threading.Thread(
        target=lambda: results.update(
            init=requests.post(f"{base}/init_weights_send_group_for_remote_instance", json=init_body, headers=headers)
        )
    )
    t.start()
    pg = init_custom_process_group(
        f"tcp://{seed_ip}:{group_port}", 2, 1, f"send_weights_{client_ip}_{group_port}_0", backend="gloo"
    )
    dist.barrier(group=pg)
    t.join()
    assert results["init"].json()["success"], results["init"].text
    t = threading.Thread(
        target=lambda: results.update(
            send=requests.post(f"{base}/send_weights_to_remote_instance", json=send_body, headers=headers)
        )
    )
    t.start()
    for _, p in params:
        dist.broadcast(p.data, src=0, group=pg)
    t.join()
    assert results["send"].json()["success"], results["send"].text
    dist.destroy_process_group(pg)
    save_file(dict(params), str(Path(out_dir) / "nccl.safetensors"))

    # TransferEngine backend.
    from mooncake.engine import TransferEngine

    params = named_parameters(weights_dir, empty=True)
    engine = TransferEngine()
    assert engine.initialize(client_ip, "P2PHANDSHAKE", "tcp", "") == 0
    for _, p in params:
        if p.numel():
            assert engine.register_memory(p.data_ptr(), p.numel() * p.element_size()) == 0
    r = requests.get(f"{base}/get_remote_instance_transfer_engine_info", params={"rank": 0}, headers=headers)
    info = r.json()
    assert info["rank"] == 0
    session_id, weights = info["remote_instance_transfer_engine_info"]
    local, remote, lengths = [], [], []
    for name, p in params:
        ptr, numel, elsize = weights[name]
        assert numel == p.numel() and elsize == p.element_size(), name
        if p.numel():
            local.append(p.data_ptr())
            remote.append(ptr)
            lengths.append(numel * elsize)
    assert engine.batch_transfer_sync_read(session_id, local, remote, lengths) >= 0
    save_file(dict(params), str(Path(out_dir) / "te.safetensors"))
    print(json.dumps({"ok": True}), flush=True)


# ---- seed -----------------------------------------------------------------------------------------------------
def seed(ip, port, weights_dir):
    from aiohttp import web
    from mooncake.engine import TransferEngine

    params = named_parameters(weights_dir, empty=False)
    groups = {}

    engine = TransferEngine()
    assert engine.initialize(ip, "P2PHANDSHAKE", "tcp", "") == 0
    session_id = f"{ip}:{engine.get_rpc_port()}"
    weights_info = {}
    for name, p in params:  # register_memory_region v1: one registration per parameter
        if p.numel():
            assert engine.register_memory(p.data_ptr(), p.numel() * p.element_size()) == 0
        weights_info[name] = [p.data_ptr(), p.numel(), p.element_size()]

    def do_init(body):
        ports = body["ports"].split(",")
        assert len(ports) == 1  # tp_size 1
        name = f"{body.get('group_name', 'weight_send_group')}_{ports[0]}_0"
        pg = init_custom_process_group(f"tcp://{body['master_address']}:{ports[0]}", body["world_size"], 0, name)
        dist.barrier(group=pg)
        groups[name] = pg

    def do_send(body):
        ports = body["ports"].split(",")
        name = f"{body.get('group_name', 'weight_send_group')}_{ports[0]}_0"
        pg = groups.pop(name)
        try:
            for _, w in params:
                dist.broadcast(w, src=0, group=pg)
        finally:
            dist.destroy_process_group(pg)

    async def init_handler(request):
        import asyncio

        try:
            await asyncio.to_thread(do_init, await request.json())
            return web.json_response({"success": True, "message": "Succeeded to init group."})
        except Exception as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)

    async def send_handler(request):
        import asyncio

        try:
            await asyncio.to_thread(do_send, await request.json())
            return web.json_response({"success": True, "message": "Succeeded to send weights."})
        except Exception as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)

    async def te_info(request):
        try:
            rank = int(request.query["rank"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "Missing or invalid rank parameter"}}, status=400)
        if rank != 0:
            return web.json_response(
                {"error": {"message": f"Failed to get transfer engine info for rank {rank}"}}, status=400
            )
        return web.json_response({"rank": rank, "remote_instance_transfer_engine_info": [session_id, weights_info]})

    async def health(request):
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/init_weights_send_group_for_remote_instance", init_handler)
    app.router.add_post("/send_weights_to_remote_instance", send_handler)
    app.router.add_get("/remote_instance_transfer_engine_info", te_info)
    app.router.add_get("/get_remote_instance_transfer_engine_info", te_info)
    web.run_app(app, host=ip, port=int(port), print=None)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "client":
        client(args[0], int(args[1]), args[2], int(args[3]), args[4], args[5], args[6])
    else:
        seed(args[0], int(args[1]), args[2])
