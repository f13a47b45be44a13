"""Runs SGLang's own code for the `sglang` test tier; started by ``tier.run`` with SGLang's folder on the path.

    python helper.py OP < request.json > answer.json

It imports SGLang (the version of tests/sglang/requirements.txt) and never seedfork: the tests compare what
SGLang did with what the agent expected. Every answer is one JSON object on the last line of stdout.

- ``resolve``: ``{"argvs": [[...], ...]}``. Each argv (the arguments after ``-m sglang.launch_server``) goes
  through SGLang's parser and resolution (``prepare_server_args``, ``resolve_once``), as ``sglang serve`` does.
  Answer per argv: ``ok``, ``error`` (the parser's message for an unknown flag), ``resolved``
  (``ServerArgs.resolved_dict()``, what ``/server_info`` serves) and ``log_line`` (what ``Engine`` logs).
- ``bootstrap``: ``{"argv": [...], "tp": N}``. Starts SGLang's ``EngineInfoBootstrapServer`` the way
  ``Engine`` does, then runs each TP worker's ``RemoteInstanceWeightTransporter`` (TransferEngine init, memory
  registration, registration with the bootstrap server) over a small CPU model, then asks the bootstrap
  server for each rank at the URL the HTTP server's ``/remote_instance_transfer_engine_info`` proxies to.
- ``models``: the fields of io_struct's R-Fork request models, SGLang's HTTP routes with their auth levels
  (read from http_server.py's source: importing it needs GPU-only packages) and the bootstrap server's routes.
- ``auth``: ``{"cases": [{"api_key", "admin_api_key", "authorization"}]}``: SGLang's own auth decision for an
  ADMIN_OPTIONAL route (``sglang.srt.utils.auth``), as the status it would answer.
- ``standby``: what a standby would use (docs/sglang.md, Standby): the request models' fields with their
  defaults, the memory tags, the memory saver as SGLang creates it, the scheduler's preconditions for
  weight updates and memory release, and the key SGLang's checkpoint-engine worker looks itself up by.
- ``handlers``: SGLang's own ``/health``, ``/ready`` and weight-update handlers and its wait for initial
  weights, taken from http_server.py's source and run over a stand-in for its global state.
- ``caches``: where SGLang puts what it compiles, with the environment the test gives: the package's import
  (``sglang/__init__`` points the third-party caches), then each cache directory SGLang resolves, and where
  it writes what holds for its node only (the custom all-reduce's P2P probe, files streamed from storage).
- ``ipc_route``: ``{"port": N, "key": device key}``: serves SGLang's own ``/update_weights_from_ipc`` handler
  on 127.0.0.1:N for one request; behind it SGLang's checkpoint-engine worker extension and the
  checkpoint-engine its extra pins load a stand-in model: what was loaded, post hooks, the status answered.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys


def _resolve_one(argv: list[str]) -> dict:
    from sglang.srt.sampling.watermarking.core import redact_watermark_secrets
    from sglang.srt.server_args import prepare_server_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = prepare_server_args(list(argv))
    except SystemExit:
        return {"ok": False, "error": err.getvalue().strip().splitlines()[-1]}
    try:
        args.resolve_once()
    except Exception as e:
        return {"ok": False, "error": f"resolution failed: {type(e).__name__}: {e}"}
    resolved = args.resolved_dict()
    # sglang/srt/entrypoints/engine.py logs exactly this (its _server_args_for_logging), once per launch.
    log_line = f"server_args={redact_watermark_secrets(resolved)}"
    return {"ok": True, "resolved": json.loads(json.dumps(resolved, default=str)), "log_line": log_line}


def resolve(req: dict) -> dict:
    return {"results": [_resolve_one(argv) for argv in req["argvs"]]}


def bootstrap(req: dict) -> dict:
    import requests
    import torch
    from sglang.srt.entrypoints.engine_info_bootstrap_server import EngineInfoBootstrapServer
    from sglang.srt.model_executor.model_runner_components.remote_instance_weight_transporter import (
        RemoteInstanceWeightTransporter,
    )
    from sglang.srt.runtime_context import SpawnRanks, get_model, get_parallel, get_serving, publish, spawn_world_rank
    from sglang.srt.server_args import prepare_server_args

    argv, tp = req["argv"], int(req["tp"])
    launcher = prepare_server_args(list(argv))
    publish(launcher, role="tokenizer")
    # sglang/srt/entrypoints/engine.py: the server starts only for a TE seed on node rank 0, on --host.
    server = None
    if get_model().remote_instance_weight_loader_start_seed_via_transfer_engine and get_parallel().node_rank == 0:
        server = EngineInfoBootstrapServer(host=get_serving().host, port=get_model().engine_info_bootstrap_port)
    url = launcher.engine_info_bootstrap_url  # what /remote_instance_transfer_engine_info proxies to
    if server is not None:
        for _ in range(100):
            with contextlib.suppress(Exception):
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger("sglang").addHandler(handler)
    models = []
    for rank in range(tp):
        worker = prepare_server_args(list(argv))  # each TP worker gets its own copy, as over a pickle
        publish(
            worker,
            role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(worker, tp_rank=rank, pp_rank=0), gpu_id=rank),
        )
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        models.append(model)
        transporter = RemoteInstanceWeightTransporter(get_model=lambda m=model: m, gpu_id=rank)
        transporter.init_engine()
        transporter.maybe_register_and_publish_weight_info()
        models.append(transporter)  # keep the engine (and its registration) alive
    served = []
    for rank in range(tp):
        try:
            r = requests.get(f"{url}/get_transfer_engine_info", params={"rank": rank}, timeout=5)
            served.append({"rank": rank, "status": r.status_code, "body": r.json()})
        except Exception as e:
            served.append({"rank": rank, "status": None, "error": f"{type(e).__name__}: {e}"})
    if server is not None:
        server.close()
    return {"bootstrap_url": url, "server_started": server is not None, "served": served, "log": logs.getvalue()}


def _fields(cls) -> dict:
    """A msgspec Struct's fields: name -> whether the field is required."""
    import msgspec

    return {
        f.name: f.required for f in msgspec.structs.fields(cls) if not f.name.startswith("_") and f.name != "rid"
    }


def _reply_keys(func) -> list[str]:
    """The keys of the JSON body a handler builds: ``body = {...}`` and ``body["k"] = ...`` (or ``content``)."""
    import ast

    keys = []
    for node in ast.walk(func):
        if not isinstance(node, ast.Assign):
            continue
        for t in node.targets:
            if getattr(t, "id", None) in ("body", "content") and isinstance(node.value, ast.Dict):
                keys += [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            elif isinstance(t, ast.Subscript) and getattr(t.value, "id", None) in ("body", "content"):
                keys += [t.slice.value] if isinstance(t.slice, ast.Constant) else []
    return keys


def _routes(source: str) -> list[dict]:
    """``@app.get/post/put/api_route(path)`` handlers of a module's source, with ``@auth_level(...)``."""
    import ast

    routes = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        calls = [d for d in node.decorator_list if isinstance(d, ast.Call)]
        auth = next((ast.unparse(d.args[0]) for d in calls if getattr(d.func, "id", None) == "auth_level"), None)
        for d in calls:
            func = d.func
            is_app = isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "app"
            if not (is_app and d.args and isinstance(d.args[0], ast.Constant)):
                continue
            methods = [func.attr.upper()]
            if func.attr == "api_route":
                kw = {k.arg: k.value for k in d.keywords}
                methods = [e.value for e in kw["methods"].elts] if "methods" in kw else ["GET"]
            for method in methods:
                routes.append(
                    {"method": method, "path": d.args[0].value, "auth": auth, "reply_keys": _reply_keys(node)}
                )
    return routes


def models(_req: dict) -> dict:
    """io_struct's R-Fork request models (field -> default) and the HTTP routes of SGLang's servers.

    The routes come from the modules' source: importing http_server needs GPU-only packages."""
    import importlib.util
    from pathlib import Path

    from sglang.srt.managers import io_struct

    names = ["InitWeightsSendGroupForRemoteInstanceReqInput", "SendWeightsToRemoteInstanceReqInput"]
    names += ["CheckWeightsReqInput", "InitWeightsSendGroupForRemoteInstanceReqOutput"]
    names += ["SendWeightsToRemoteInstanceReqOutput"]
    fields = {n: _fields(getattr(io_struct, n)) for n in names}

    def source(module: str) -> str:
        return Path(importlib.util.find_spec(module).origin).read_text()

    return {
        "models": fields,
        "routes": _routes(source("sglang.srt.entrypoints.http_server")),
        "bootstrap_routes": _routes(source("sglang.srt.entrypoints.engine_info_bootstrap_server")),
    }


def options(_req: dict) -> dict:
    """Every option string of SGLang's parser, and which field (dest) each sets."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return {"options": {o: a.dest for a in parser._actions for o in a.option_strings}}


def check(req: dict) -> dict:
    """Build each ``{"model", "body"}`` as io_struct's model: unknown or missing fields, or a value of the wrong
    plain type, are an error. (The models are array-like msgspec Structs, built from JSON objects by name.)"""
    import msgspec
    from sglang.srt.managers import io_struct

    out = []
    for case in req["cases"]:
        cls, body = getattr(io_struct, case["model"]), case["body"]
        try:
            cls(**body)
            for f in msgspec.structs.fields(cls):
                if f.name in body and f.type in (str, int, bool, float) and not isinstance(body[f.name], f.type):
                    raise TypeError(f"{f.name}: expected {f.type.__name__}, got {type(body[f.name]).__name__}")
            out.append(None)
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    return {"errors": out}


def auth(req: dict) -> dict:
    """SGLang's own auth decision (utils/auth.decide_request_auth) per case, as the status it answers."""
    from sglang.srt.utils.auth import AuthLevel, decide_request_auth

    out = []
    for case in req["cases"]:
        d = decide_request_auth(
            method=case["method"], path=case["path"], authorization_header=case.get("authorization"),
            api_key=case.get("api_key"), admin_api_key=case.get("admin_api_key"),
            auth_level=AuthLevel(case.get("level", "admin_optional")),
        )  # fmt: skip
        out.append(200 if d.allowed else d.error_status_code)
    return {"statuses": out}


def stock_client(req: dict) -> dict:
    """SGLang's own NCCL client, as a TP rank 0 runs it (over gloo on a CPU): the init request in a thread
    (load_model_utils.maybe_trigger_remote_instance_nccl_send_group), then the group join
    (connector/remote_instance.build_group's init_custom_process_group, with SGLang's default timeout)."""
    import threading
    import time

    from sglang.srt.model_loader.remote_instance_weight_loader_utils import (
        trigger_init_weights_send_group_for_remote_instance_request,
    )
    from sglang.srt.utils.common import init_custom_process_group

    seed_ip, seed_port, ports, client_ip = req["seed_ip"], req["seed_port"], req["ports"], req["client_ip"]
    thread = threading.Thread(
        target=trigger_init_weights_send_group_for_remote_instance_request,
        args=(seed_ip, seed_port, ports, client_ip),
    )
    started = time.monotonic()
    thread.start()
    try:
        init_custom_process_group(
            backend="gloo",
            init_method=f"tcp://{seed_ip}:{ports[0]}",
            world_size=2,
            rank=1,
            group_name=f"send_weights_{client_ip}_{ports[0]}_0",
        )
        outcome = "joined"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    thread.join(timeout=30)
    return {"outcome": outcome, "seconds": time.monotonic() - started}


STANDBY_MODELS = [
    "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput", "UpdateWeightsFromIPCReqInput",
    "UpdateWeightsFromTensorReqInput", "InitWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput",
    "UpdateWeightFromDiskReqInput", "PauseGenerationReqInput", "ContinueGenerationReqInput",
    "BeginWeightUpdateReqInput", "EndWeightUpdateReqInput",
]  # fmt: skip


def _defaults(cls) -> dict:
    """A request model's own fields (not BaseReq's): name -> its default, ``"<required>"`` for none."""
    import msgspec
    from sglang.srt.managers.io_struct import BaseReq

    base = {f.name for f in msgspec.structs.fields(BaseReq)}
    return {
        f.name: "<required>" if f.required else f.default
        for f in msgspec.structs.fields(cls)
        if f.name not in base
    }


def _outcome(call) -> str:
    """What a call did: ``ok: <value>`` or ``<Exception>: <message>``."""
    try:
        return f"ok: {call()!r}"
    except BaseException as e:  # an AssertionError is an answer here
        return f"{type(e).__name__}: {e}"


def _updater(is_idle: bool):
    """SGLang's scheduler-side weight updater, built without ``__post_init__`` (it reads the TP group, which
    needs torch.distributed): the checks run here return before any collective."""
    from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager
    from sglang.srt.utils.torch_memory_saver_adapter import TorchMemorySaverAdapter

    m = object.__new__(SchedulerWeightUpdaterManager)
    fields = dict(tp_worker=None, draft_worker=None, scheduler=None, metrics_collector=None, _session=None,
                  memory_saver_adapter=TorchMemorySaverAdapter.create(enable=False), offload_tags=set(),
                  stashed_model_static_state=None, flush_cache=lambda **_: True,
                  is_fully_idle=lambda **_: is_idle)  # fmt: skip
    for name, value in fields.items():
        object.__setattr__(m, name, value)
    return m


def standby(_req: dict) -> dict:
    import importlib.metadata

    from sglang.srt.checkpoint_engine.checkpoint_engine_worker import SGLangCheckpointEngineWorkerExtensionImpl
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES
    from sglang.srt.managers import io_struct
    from sglang.srt.utils.torch_memory_saver_adapter import TorchMemorySaverAdapter

    noop = TorchMemorySaverAdapter.create(enable=False)
    updater = _updater(True)
    tensor = io_struct.UpdateWeightsFromTensorReqInput(serialized_named_tensors=[])
    distributed = io_struct.UpdateWeightsFromDistributedReqInput(names=[], dtypes=[], shapes=[])
    release = io_struct.ReleaseMemoryOccupationReqInput(tags=["kv_cache"])
    return {
        "models": {n: _defaults(getattr(io_struct, n)) for n in STANDBY_MODELS},
        "memory_tags": list(GPU_MEMORY_ALL_TYPES),
        "saver_off": {"class": type(noop).__name__, "enabled": noop.enabled,
                      "pause": _outcome(lambda: noop.pause("weights"))},
        "saver_on": _outcome(lambda: type(TorchMemorySaverAdapter.create(enable=True)).__name__),
        "requires": importlib.metadata.distribution("sglang").requires,
        "tensor_without_session": _outcome(lambda: updater.update_weights_from_tensor(tensor).message),
        "distributed_without_session": _outcome(lambda: updater.update_weights_from_distributed(distributed).message),
        "release_while_busy": _outcome(lambda: _updater(False).release_memory_occupation(release)),
        "ipc_key": _outcome(lambda: SGLangCheckpointEngineWorkerExtensionImpl(None).get_device_uuid()),
    }  # fmt: skip


def _handler_functions(names: list[str], namespace: dict) -> dict:
    """The named top-level functions of SGLang's http_server.py, undecorated, defined in ``namespace``."""
    import ast
    import importlib.util
    from pathlib import Path

    path = Path(importlib.util.find_spec("sglang.srt.entrypoints.http_server").origin)
    nodes = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) in names]
    for node in nodes:
        node.decorator_list = []  # the routes and auth decorators need the app
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return {n: namespace[n] for n in names}


def _stand_in_manager():
    """The tokenizer manager's state the handlers read, with SGLang's own ``is_ready``; updates that succeed."""
    import types

    from sglang.srt.managers.tokenizer_manager import ServerStatus, TokenizerManager

    async def disk_updated(*_args):
        return True, "updated", 0

    async def ipc_updated(*_args):
        return True, "updated"

    manager = types.SimpleNamespace(gracefully_exit=False, server_status=ServerStatus.Starting, is_pause=False,
                                    initial_weights_loaded=False, update_weights_from_disk=disk_updated,
                                    update_weights_from_ipc=ipc_updated)  # fmt: skip
    manager.is_healthy = types.MethodType(TokenizerManager.is_healthy, manager)
    manager.is_ready = types.MethodType(TokenizerManager.is_ready, manager)
    return manager


def handlers(_req: dict) -> dict:
    """Stand-ins: the tokenizer manager (``_stand_in_manager``), a request (its path), and a 1 s wait for
    initial weights instead of SGLang's default (SGLANG_WAIT_WEIGHTS_READY_TIMEOUT, read at import). With
    SGLang's default /health generates a token, which needs a model: the probes turn that off first."""
    import asyncio
    import os
    import time
    import types
    from http import HTTPStatus

    from fastapi import Response
    from fastapi.responses import ORJSONResponse
    from sglang.srt.environ import envs
    from sglang.srt.managers.tokenizer_manager import ServerStatus

    manager = _stand_in_manager()
    namespace = dict(_global_state=types.SimpleNamespace(tokenizer_manager=manager), ServerStatus=ServerStatus,
                     Response=Response, ORJSONResponse=ORJSONResponse, HTTPStatus=HTTPStatus, envs=envs,
                     WAIT_WEIGHTS_READY_TIMEOUT=1, logger=logging.getLogger("sglang"), time=time)  # fmt: skip
    names = ["health_generate", "ready", "_wait_weights_ready", "update_weights_from_disk", "update_weights_from_ipc"]
    f = _handler_functions(names, namespace)
    request = types.SimpleNamespace(url=types.SimpleNamespace(path="/health"))

    def probes() -> list[int]:
        return [asyncio.run(f["health_generate"](request)).status_code, asyncio.run(f["ready"]()).status_code]

    out = {"generates": envs.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION.get()}
    os.environ["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "false"  # so /health answers without a model
    out |= {"starting": probes(), "wait_without_weights": _outcome(f["_wait_weights_ready"])}
    asyncio.run(f["update_weights_from_disk"](None, request))
    out["loaded_after_disk"] = manager.initial_weights_loaded
    asyncio.run(f["update_weights_from_ipc"](None, request))
    out["loaded_after_ipc"] = manager.initial_weights_loaded
    manager.server_status = ServerStatus.Up
    out["up"] = probes()
    manager.is_pause = True  # what the tokenizer manager's pause_generation sets
    out["paused"] = probes()
    return out


def ipc_route(req: dict) -> dict:
    """Stand-ins: the tokenizer manager's fan-out to the scheduler and its TP worker (SGLang's
    ``WeightUpdater.update_weights_from_ipc`` builds the worker extension and answers as here), the device
    key and id (a GPU's; the request's ``key`` instead), CUDA's synchronize and empty_cache (no-ops), and
    the model (a module whose ``load_weights`` records what arrives). The handler, the request model, the
    worker extension with its post hook, and checkpoint-engine's receiver are SGLang's and its pin's own."""
    import asyncio
    import importlib.metadata
    import threading
    import types
    from http import HTTPStatus
    from typing import Annotated

    import torch
    import uvicorn
    from fastapi import Body, FastAPI, Request
    from fastapi.responses import ORJSONResponse
    from sglang.srt.checkpoint_engine.checkpoint_engine_worker import SGLangCheckpointEngineWorkerExtensionImpl
    from sglang.srt.managers.io_struct import UpdateWeightsFromIPCReqInput

    torch.cuda.synchronize = lambda *_a, **_k: None
    torch.cuda.empty_cache = lambda: None
    loaded, hooks, answers = [], [], []

    class Model(torch.nn.Module):
        def load_weights(self, weights) -> None:
            loaded.extend([name, list(t.shape), float(t.double().sum())] for name, t in weights)

        def post_load_weights(self) -> None:
            hooks.append(1)

    class Worker(SGLangCheckpointEngineWorkerExtensionImpl):
        def get_device_uuid(self) -> str:
            return req["key"]

        def get_device_id(self) -> None:
            return None  # a CPU buffer's handle has no device index to rewrite

    runner = types.SimpleNamespace(model=Model())

    async def update_weights_from_ipc(obj, _request):
        try:
            await asyncio.to_thread(Worker(runner).update_weights_from_ipc, obj.zmq_handles)
            return True, "IPC weight update completed successfully"
        except Exception as e:
            return False, str(e)

    manager = types.SimpleNamespace(update_weights_from_ipc=update_weights_from_ipc, initial_weights_loaded=False)
    namespace = dict(_global_state=types.SimpleNamespace(tokenizer_manager=manager), Annotated=Annotated,
                     UpdateWeightsFromIPCReqInput=UpdateWeightsFromIPCReqInput, Body=Body, Request=Request,
                     ORJSONResponse=ORJSONResponse, HTTPStatus=HTTPStatus)  # fmt: skip
    handler = _handler_functions(["update_weights_from_ipc"], namespace)["update_weights_from_ipc"]
    app = FastAPI()
    app.post("/update_weights_from_ipc")(handler)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=req["port"], log_level="warning"))

    @app.middleware("http")
    async def one_request(request, call_next):
        response = await call_next(request)
        answers.append(response.status_code)
        server.should_exit = True
        return response

    timer = threading.Timer(req.get("timeout_s", 60), lambda: setattr(server, "should_exit", True))
    timer.start()
    server.run()
    timer.cancel()
    return {"loaded": loaded, "post_hooks": len(hooks), "answers": answers,
            "initial_weights_loaded": manager.initial_weights_loaded,
            "checkpoint_engine": importlib.metadata.version("checkpoint-engine")}  # fmt: skip


def caches(_req: dict) -> dict:
    import importlib.util
    import inspect
    import os
    import re
    from pathlib import Path

    import sglang  # noqa: F401  (its import points Triton, Inductor, CUDA, TileLang and FlashInfer)
    import sglang.srt.distributed.device_communicators.custom_all_reduce_utils as all_reduce
    from sglang.kernels.jit.utils.compile import cache as jit_cache
    from sglang.srt.environ import envs, third_party_cache_defaults
    from sglang.srt.utils.runai_utils import ObjectStorageModel

    dirs = {k: os.environ.get(k) for k in third_party_cache_defaults()}
    dirs["DeepGEMM"] = envs.SGLANG_DG_CACHE_DIR.get()
    dirs["CuTe DSL AOT"] = envs.SGLANG_CUTE_AOT_CACHE_DIR.get()
    dirs["JIT kernels"] = str(jit_cache.cache_root())
    # torch.compile's backend imports GPU-only modules: read from its source
    backend = Path(importlib.util.find_spec("sglang.srt.compilation.backend").origin).read_text()
    compile_base = re.search(r"base_cache_dir = (.+)\n", backend)
    # The P2P probe's file: its name's f-string and the root it is joined to, as the source has them.
    p2p = re.search(r'os\.path\.join\(\s*(\w+),\s*f"(gpu_p2p_access_cache_for_[^"]+)"', inspect.getsource(all_reduce))
    root_of = re.search(rf"{p2p.group(1)} = (.+)\n", inspect.getsource(all_reduce)) if p2p else None
    return {
        "dirs": dirs,
        "torch_compile_base": compile_base.group(1).strip() if compile_base else None,
        "sglang_cache_dir": envs.SGLANG_CACHE_DIR.get(),
        "p2p_name": p2p.group(2) if p2p else None,
        "p2p_root": root_of.group(1).strip() if root_of else None,
        "streamed_model": ObjectStorageModel.get_path("s3://bucket/model"),
    }


OPS = {
    "caches": caches,
    "standby": standby,
    "ipc_route": ipc_route,
    "handlers": handlers,
    "stock_client": stock_client,
    "resolve": resolve,
    "bootstrap": bootstrap,
    "models": models,
    "check": check,
    "options": options,
    "auth": auth,
}


def main() -> None:
    op = sys.argv[1]
    req = json.loads(sys.stdin.read() or "{}")
    answer = OPS[op](req)
    sys.stdout.write("\n" + json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
