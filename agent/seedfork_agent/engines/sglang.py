"""The SGLang adapter: render R-Fork launch flags from the pod contract and supervise the result.

SGLang moves its own bytes: the agent picks the flags, and then checks that SGLang really did what the
flags asked, because SGLang silently falls back to loading from disk and has no metadata check of its
own. Everything here but ``SGLangSupervisor`` is pure. The flags, what SGLang resolves them to, and the
endpoints and keys the supervisor uses are in docs/sglang.md, with the SGLang version they were verified
against; the `sglang` test tier (tests/sglang/) runs SGLang's own parser, resolution and bootstrap code
on every command rendered here.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from seedfork_api.contract import Assignment, sglang_own_ports
from seedfork_api.engines import ENGINES, resolve_backend
from seedfork_api.sglang_args import data_parallel_problem

log = logging.getLogger("seedfork.agent.sglang")

Role = Literal["seed", "client"]

# ServerArgs field names: the flag names with dashes turned into underscores.
LOAD_FORMAT = "load_format"
BACKEND = "remote_instance_weight_loader_backend"
SEED_IP = "remote_instance_weight_loader_seed_instance_ip"
SEED_PORT = "remote_instance_weight_loader_seed_instance_service_port"
GROUP_PORTS = "remote_instance_weight_loader_send_weights_group_ports"
TE_SEED = "remote_instance_weight_loader_start_seed_via_transfer_engine"
BOOTSTRAP_PORT = "engine_info_bootstrap_port"
DIST_INIT_ADDR = "dist_init_addr"

# Flags the adapter owns: a user template that sets them would silently fight the agent.
OWNED_FLAGS = {
    "--load-format",
    "--remote-instance-weight-loader-seed-instance-ip",
    "--remote-instance-weight-loader-seed-instance-service-port",
    "--remote-instance-weight-loader-send-weights-group-ports",
    "--remote-instance-weight-loader-backend",
    "--remote-instance-weight-loader-start-seed-via-transfer-engine",
    "--engine-info-bootstrap-port",
    "--dist-init-addr",
    "--nccl-init-addr",
}
_TP_FLAGS = ("--tp-size", "--tp", "--tensor-parallel-size")
_PP_FLAGS = ("--pp-size", "--pp", "--pipeline-parallel-size")
_DP_FLAGS = ("--dp-size", "--dp", "--data-parallel-size")


class LayoutRefused(ValueError):
    """A layout or flag set R-Fork cannot serve; the pod must load from storage or fail, not hang."""


def flag_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last occurrence of any of ``names`` (``--x v`` or ``--x=v``)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _int_flag(argv: Sequence[str], names: Sequence[str], default: int = 1) -> int:
    raw = flag_value(argv, names)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise LayoutRefused(f"{names[0]} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @classmethod
    def of(cls, argv: Sequence[str]) -> Layout:
        return cls(_int_flag(argv, _TP_FLAGS), _int_flag(argv, _PP_FLAGS), _int_flag(argv, _DP_FLAGS))


def check_layout(layout: Layout, backend: str) -> None:
    """Refuse what R-Fork cannot serve (docs/sglang.md); the TransferEngine limit is SGLang's row in
    ``seedfork_api.engines``, which admission checks too."""
    if layout.dp > 1:
        raise LayoutRefused(f"data parallel size {layout.dp} > 1: R-Fork asserts num_dp_ranks == 1")
    te_pp = ENGINES["sglang"].te_max_pp
    if backend == "transfer_engine" and te_pp is not None and layout.pp > te_pp.most:
        raise LayoutRefused(
            f"pipeline parallel size {layout.pp} > {te_pp.most} with transfer_engine: {te_pp.why}, "
            "so pipeline stages overwrite each other"
        )
    if layout.pp > 1:
        raise LayoutRefused(f"pipeline parallel size {layout.pp} > 1: R-Fork has no pipeline-parallel handling")


@dataclass(frozen=True)
class Launch:
    """A rendered SGLang launch and what its resolved server args must show."""

    argv: list[str]
    env: dict[str, str]
    role: Role
    backend: str | None
    expected: dict[str, object]  # ServerArgs field -> value SGLang must have resolved
    can_seed: bool  # whether this instance can serve R-Fork clients once loaded
    layout: Layout = field(default_factory=Layout)


def render(
    base_argv: Sequence[str],
    *,
    pod_ip: str,
    engine_port: int,
    bootstrap_port: int,
    assignment: Assignment | None,
    seed_backend: str = "transfer_engine",
    protocol: str = "auto",
    tp: int | None = None,
    pp: int | None = None,
    dist_init_port: int | None = None,
) -> Launch:
    """The SGLang command for this pod.

    ``base_argv`` is the engine command from the pod template (model path, TP size, ...). With an
    assignment from a seed, the pod is an R-Fork client; otherwise (storage) it loads from disk and
    becomes a seed, started with the TransferEngine seed flag unless the set's backend is ``nccl``.
    ``tp``/``pp`` from the pod contract must agree with the command's own flags.

    ``dist_init_port`` renders ``--dist-init-addr <pod IP>:<port>``: SGLang's TP workers register their
    TransferEngine info with the bootstrap server at that address's host, and at 127.0.0.1 without it,
    where nothing listens because the bootstrap server binds ``--host`` (docs/sglang.md, "TransferEngine
    seeds").
    """
    argv = list(base_argv)
    problem = data_parallel_problem(argv)
    if problem:
        raise LayoutRefused(problem)
    owned = sorted({a.split("=", 1)[0] for a in argv} & OWNED_FLAGS)
    if owned:
        raise LayoutRefused(f"the engine command sets flags the agent owns: {', '.join(owned)}")
    for names, want in ((_TP_FLAGS, tp), (_PP_FLAGS, pp)):
        have = _int_flag(argv, names)
        if want is not None and have != want:
            raise LayoutRefused(f"{names[0]} {have} in the engine command, but the pod contract says {want}")
    host, port = flag_value(argv, ("--host",)), flag_value(argv, ("--port",))
    if host not in (None, pod_ip) or port not in (None, str(engine_port)):
        raise LayoutRefused(f"engine command binds {host}:{port}, the pod contract says {pod_ip}:{engine_port}")
    if host is None:
        argv += ["--host", pod_ip]
    if port is None:
        argv += ["--port", str(engine_port)]
    layout = Layout.of(argv)
    env = {"SGLANG_HOST_IP": pod_ip, "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
    env |= mooncake_env(protocol)
    argv += ["--engine-info-bootstrap-port", str(bootstrap_port)]
    expected: dict[str, object] = {BOOTSTRAP_PORT: bootstrap_port}
    if dist_init_port is not None:
        addr = f"[{pod_ip}]:{dist_init_port}" if ":" in pod_ip else f"{pod_ip}:{dist_init_port}"
        argv += ["--dist-init-addr", addr]
        expected[DIST_INIT_ADDR] = addr

    if assignment is not None and assignment.source == "seed":
        backend = assignment.backend
        if backend not in ("nccl", "transfer_engine"):
            raise LayoutRefused(f"seed assignment without a concrete backend: {backend!r}")
        if not assignment.seed_ip:
            raise LayoutRefused("seed assignment without a seed IP: SGLang would silently load from disk")
        check_layout(layout, backend)
        argv += [
            "--load-format",
            "remote_instance",
            "--remote-instance-weight-loader-backend",
            backend,
            "--remote-instance-weight-loader-seed-instance-ip",
            assignment.seed_ip,
            "--remote-instance-weight-loader-seed-instance-service-port",
            str(engine_port),  # every pod of a set serves on the set's engine port
        ]
        expected |= {LOAD_FORMAT: "remote_instance", BACKEND: backend, SEED_IP: assignment.seed_ip}
        expected[SEED_PORT] = engine_port
        if backend == "nccl":
            ports = list(assignment.group_ports)
            if len(ports) != layout.tp:
                raise LayoutRefused(
                    f"NCCL needs one group port per TP rank ({layout.tp}), the assignment has {len(ports)}: "
                    "without them SGLang silently loads from disk"
                )
            argv += ["--remote-instance-weight-loader-send-weights-group-ports", json.dumps(ports).replace(" ", "")]
            expected[GROUP_PORTS] = ports
        # A TE-loaded instance does not publish its own TE info, so it cannot seed (docs/sglang.md; SGLang's row).
        can_seed = ENGINES["sglang"].seeds_after(backend)
        return Launch(argv, env, "client", backend, expected, can_seed=can_seed, layout=layout)

    seed_backend = resolve_backend(seed_backend, "sglang")
    check_layout(layout, seed_backend)
    if seed_backend == "transfer_engine":
        if "--enable-memory-saver" in argv:
            raise LayoutRefused("--enable-memory-saver silently turns off the TransferEngine seed flag")
        argv.append("--remote-instance-weight-loader-start-seed-via-transfer-engine")
        expected[TE_SEED] = True
        return Launch(argv, env, "seed", "transfer_engine", expected, can_seed=True, layout=layout)
    return Launch(argv, env, "seed", "nccl", expected, can_seed=True, layout=layout)


def sglang_key(argv: Sequence[str], admin: bool = True) -> tuple[str | None, str | None]:
    """(flag, key) SGLang checks on a route: ``admin`` for its ADMIN_OPTIONAL routes (``/weights_checker``,
    the TransferEngine info: the admin key if set, else the API key), else for its NORMAL ones
    (``/server_info``: the API key only), as in SGLang 0.5.23's ``sglang/srt/utils/auth.py``.

    SGLang reads its keys only from its flags, so the engine command is where the agent finds them
    (Kubernetes expands ``$(VAR)`` in args, e.g. from a Secret).
    """
    for flag in ("--admin-api-key", "--api-key") if admin else ("--api-key",):
        key = flag_value(argv, (flag,))
        if key:
            return flag, key
    return None, None


def mooncake_env(protocol: str) -> dict[str, str]:
    """What SGLang's TransferEngine needs for the set's ``protocol``.

    SGLang passes ``MOONCAKE_PROTOCOL`` (default ``rdma``) to ``TransferEngine.initialize``; Mooncake takes
    NVLink within a node only with ``MC_INTRANODE_NVLINK=1`` and forces TCP with ``MC_FORCE_TCP=1`` (the
    same settings the agent's own TransferEngine uses, ``seedfork_agent.te``). ``auto`` leaves SGLang's
    default.
    """
    if protocol == "auto":
        return {}
    if protocol == "tcp":
        return {"MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}
    if protocol == "rdma":
        return {"MOONCAKE_PROTOCOL": "rdma"}
    if protocol == "nvlink_intra":
        return {"MOONCAKE_PROTOCOL": "nvlink_intra", "MC_INTRANODE_NVLINK": "1"}
    raise LayoutRefused(f"transfer.protocol {protocol!r} is not one SGLang's TransferEngine supports")


def fallback_problems(expected: Mapping[str, object], resolved: Mapping[str, object]) -> list[str]:
    """What SGLang resolved differently from what we asked: each entry is a silent fallback."""
    problems = []
    for key, want in expected.items():
        if key not in resolved:
            problems.append(f"{key} missing from the resolved server args")
            continue
        got = resolved[key]
        if key == GROUP_PORTS and isinstance(got, str):
            try:
                got = json.loads(got)
            except ValueError:
                pass
        if got != want and str(got) != str(want):
            problems.append(f"{key}={got!r}, asked for {want!r}")
    if resolved.get(LOAD_FORMAT) == "auto" and expected.get(LOAD_FORMAT) == "remote_instance":
        problems.insert(0, "SGLang fell back to loading from disk (load_format auto)")
    if expected.get(TE_SEED) and not resolved.get(TE_SEED):
        problems.insert(0, "SGLang turned the TransferEngine seed flag off (TransferEngine validation failed)")
    return problems


_LOG_MARK = "server_args={"
# One ``'key': value`` pair of the logged dict, for a line that is not a Python literal as a whole.
_PAIR = re.compile(r"'(\w+)': ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\[[^\]]*\]|[^,{}\[\]]+?)(?=, '|}$)")


def resolved_args_from_log(log_text: str) -> dict[str, object]:
    """SGLang's resolved server args from its log: the last ``server_args={...}`` line.

    SGLang 0.5.23's Engine logs ``server_args=`` followed by ``ServerArgs.resolved_dict()`` once per launch
    (what ``/server_info`` serves too). ``ServerArgs(...)``, its repr, shows the raw inputs, not what
    resolution decided, so it is never read.
    """
    found: dict[str, object] = {}
    for line in log_text.splitlines():
        at = line.find(_LOG_MARK)
        if at < 0:
            continue
        text = line[at + len(_LOG_MARK) - 1 :].strip()
        try:
            value = ast.literal_eval(text)
            found = value if isinstance(value, dict) else {}
            continue
        except (ValueError, SyntaxError):
            pass
        found = {}
        for m in _PAIR.finditer(text):
            try:
                found[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                found[m.group(1)] = m.group(2)
    return found


def checksums_match(seed: Mapping, client: Mapping) -> tuple[bool, str]:
    """Compare two ``/weights_checker {"action": "checksum"}`` answers."""
    a, b = seed.get("per_engine_checksum"), client.get("per_engine_checksum")
    if a is None or b is None:
        return False, "a /weights_checker answer lacks per_engine_checksum"
    if a != b:
        return False, f"weights differ from the seed: {b!r} != {a!r}"
    return True, "per_engine_checksum matches the seed"


@dataclass
class Outcome:
    state: Literal["verified", "failed"]
    error: str | None = None
    can_seed: bool = False
    resolved: dict = field(default_factory=dict)
    digest: str | None = None  # of the weights as /weights_checker sums them: one set serves one (status.weightsDigest)


def weights_digest(checksum: Mapping) -> str | None:
    """A digest of a ``/weights_checker`` answer's ``per_engine_checksum`` (None when it has none)."""
    sums = checksum.get("per_engine_checksum")
    return hashlib.sha256(json.dumps(sums).encode()).hexdigest() if sums is not None else None


class SGLangSupervisor:
    """Checks a launched SGLang: healthy, no silent fallback, weights equal to the seed's.

    ``log_text`` returns the server's log so far (the ``ServerArgs`` repr there is used when the
    server-info endpoint is unavailable).
    """

    def __init__(self, launch: Launch, engine_url: str, seed_url: str | None) -> None:
        self.launch = launch
        self.engine_url = engine_url.rstrip("/")
        self.seed_url = seed_url.rstrip("/") if seed_url else None
        # SGLang's own key, never seedfork's token: SGLang checks its keys, and the token must not leak to it.
        self.key_flag, key = sglang_key(launch.argv)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.normal_flag, normal_key = sglang_key(launch.argv, admin=False)
        self.normal_headers = {"Authorization": f"Bearer {normal_key}"} if normal_key else {}

    def _checked(self, r, what: str, flag: str | None = None):
        flag = self.key_flag if flag is None and what != "server_info" else flag
        if r.status_code in (401, 403):
            if flag is None:
                raise PermissionError(
                    f"SGLang answered {r.status_code} to {what}: it runs with an API key (--api-key or "
                    "--admin-api-key) the agent cannot see; give it in the engine command's args (from a Secret: "
                    "an env var with valueFrom.secretKeyRef, and args: [--admin-api-key, $(VAR)])"
                )
            raise PermissionError(f"SGLang answered {r.status_code} to {what} with the key of {flag}")
        return r

    async def _get(self, client, url: str):
        return self._checked(await client.get(url, headers=self.headers), url.rsplit("/", 1)[-1])

    async def wait_healthy(self, client, timeout_s: float, proc: asyncio.subprocess.Process | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"SGLang exited with code {proc.returncode} before it was healthy")
            try:
                if (await self._get(client, f"{self.engine_url}/health")).status_code == 200:
                    return
            except Exception:
                pass  # not listening yet
            await asyncio.sleep(0.2)
        raise TimeoutError(f"SGLang at {self.engine_url} not healthy within {timeout_s}s")

    async def resolved_args(self, client, log_text: str = "") -> dict:
        for path in ("/server_info", "/get_server_info"):
            try:  # a NORMAL route: only --api-key guards it
                r = await client.get(f"{self.engine_url}{path}", headers=self.normal_headers)
                self._checked(r, "server_info", self.normal_flag)
            except PermissionError:
                raise
            except Exception:
                continue
            if r.status_code == 200:
                return r.json()
        return resolved_args_from_log(log_text)

    async def checksum(self, client, url: str) -> dict:
        r = self._checked(
            await client.post(f"{url}/weights_checker", json={"action": "checksum"}, headers=self.headers),
            f"{url}/weights_checker",
        )
        r.raise_for_status()
        return r.json()

    async def wait_te_info(self, client, timeout_s: float) -> None:
        """A TE seed is usable once every TP rank publishes its info (registration can take seconds)."""
        deadline = time.monotonic() + timeout_s
        for rank in range(self.launch.layout.tp):
            while True:
                r = await self._get(client, f"{self.engine_url}/remote_instance_transfer_engine_info?rank={rank}")
                if r.status_code == 200 and r.json().get("remote_instance_transfer_engine_info"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TransferEngine info for rank {rank} not published within {timeout_s}s")
                await asyncio.sleep(0.2)

    async def supervise(
        self, timeout_s: float = 600.0, log_text=lambda: "", proc: asyncio.subprocess.Process | None = None
    ) -> Outcome:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            try:
                await self.wait_healthy(client, timeout_s, proc)
                resolved = await self.resolved_args(client, log_text())
                problems = fallback_problems(self.launch.expected, resolved)
                if problems:
                    return Outcome("failed", "; ".join(problems), resolved=resolved)
                if self.launch.role == "seed":
                    if self.launch.backend == "transfer_engine":
                        await self.wait_te_info(client, timeout_s)
                    try:
                        digest = weights_digest(await self.checksum(client, self.engine_url))
                    except Exception as e:  # the digest is for the operator's one-digest rule; serving goes on
                        log.warning("no /weights_checker digest from the seed: %s", e)
                        digest = None
                    return Outcome("verified", can_seed=True, resolved=resolved, digest=digest)
                if self.seed_url is None:
                    return Outcome("failed", "no seed URL to verify against", resolved=resolved)
                seed_sum, own_sum = await asyncio.gather(
                    self.checksum(client, self.seed_url), self.checksum(client, self.engine_url)
                )
            except Exception as e:
                return Outcome("failed", f"{type(e).__name__}: {e}")
        ok, detail = checksums_match(seed_sum, own_sum)
        if not ok:
            return Outcome("failed", detail, resolved=resolved)
        return Outcome("verified", can_seed=self.launch.can_seed, resolved=resolved, digest=weights_digest(own_sum))


async def start(launch: Launch, log_path: str, base_env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start SGLang with the rendered command and env, output to ``log_path``, in its own session."""
    import os

    env = {**(os.environ if base_env is None else base_env), **launch.env}
    log = open(log_path, "wb")  # noqa: ASYNC230, SIM115 (a local file, handed to the child)
    try:
        return await asyncio.create_subprocess_exec(
            *launch.argv, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        log.close()


def log_reader(log_path: str):
    """A callable returning the log so far (``SGLangSupervisor.supervise``'s ``log_text``)."""

    def read_log() -> str:
        with open(log_path, errors="replace") as f:
            return f.read()

    return read_log


async def launch_and_supervise(
    launch: Launch,
    engine_url: str,
    seed_url: str | None,
    log_path: str,
    timeout_s: float = 600.0,
    base_env: Mapping[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, Outcome]:
    """``start`` SGLang, then supervise it.

    On a failed outcome the process is left running for the caller to inspect and stop: the pod
    restarts it with a new assignment (another seed, or storage).
    """
    proc = await start(launch, log_path, base_env)
    outcome = await SGLangSupervisor(launch, engine_url, seed_url).supervise(
        timeout_s, log_reader(log_path), proc
    )
    return proc, outcome


def render_for_pod(
    base_argv: Sequence[str], env, assignment: Assignment | None, bootstrap_port: int | None = None
) -> Launch:
    """``render`` with everything the pod contract (``seedfork_api.contract.PodEnv``) already says.

    SGLang's own listeners, the dist-init store and the engine-info bootstrap server, take the two ports
    at the top of the set's range (``sglang_own_ports``), which the operator never hands out as group ports.
    """
    dist_init_port, own_bootstrap = sglang_own_ports(env.port_range)
    return render(
        base_argv,
        pod_ip=env.pod_ip,
        engine_port=env.engine_port,
        bootstrap_port=own_bootstrap if bootstrap_port is None else bootstrap_port,
        dist_init_port=dist_init_port,
        assignment=assignment,
        seed_backend=env.backend,
        protocol=env.protocol,
        tp=env.tp,
        pp=env.pp,
    )


def wait_for_file(path: str, timeout_s: float) -> str:
    """The content of ``path`` once non-empty (a downward-API volume updates when the annotation appears)."""
    from pathlib import Path

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"no assignment in {path} after {timeout_s}s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """``python -m seedfork_agent.engines.sglang render|launch [--assignment JSON] -- <sglang command>``.

    Reads the pod contract from the environment. ``render`` prints the command and env as JSON;
    ``launch`` starts SGLang, supervises it, prints the outcome, and then waits on SGLang (exit 1 and
    SGLang stopped if the outcome is ``failed``).
    """
    import argparse
    import signal
    import sys

    from seedfork_api.contract import PodEnv

    ap = argparse.ArgumentParser(prog="python -m seedfork_agent.engines.sglang")
    ap.add_argument("cmd", choices=["render", "launch"])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--assignment", help="the seedfork.io/assignment annotation (JSON); none: load from storage")
    src.add_argument(
        "--assignment-file",
        help="a downward-API file holding that annotation; waits (up to --timeout) until the operator wrote it",
    )
    ap.add_argument("--bootstrap-port", type=int, default=None, help="default: from the set's port range")
    ap.add_argument("--log", default="sglang.log")
    ap.add_argument("--timeout", type=float, default=None, help="seconds (default: the contract's timeout)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, base = ap.parse_args(argv[:split]), argv[split + 1 :]
    if not base:
        ap.error("give the SGLang command after --")
    env = PodEnv.from_environ()
    raw = args.assignment
    if args.assignment_file:
        raw = wait_for_file(args.assignment_file, args.timeout or env.timeout_seconds)
    assignment = Assignment.model_validate_json(raw) if raw else None
    try:
        launch = render_for_pod(base, env, assignment, args.bootstrap_port)
    except LayoutRefused as e:
        print(json.dumps({"state": "failed", "error": str(e)}), flush=True)
        return 2
    if args.cmd == "render":
        print(json.dumps({"argv": launch.argv, "env": launch.env, "role": launch.role, "canSeed": launch.can_seed}))
        return 0
    seed_url = f"http://{assignment.seed_ip}:{env.engine_port}" if assignment and assignment.source == "seed" else None

    async def run() -> int:
        proc, outcome = await launch_and_supervise(
            launch, f"http://{env.pod_ip}:{env.engine_port}", seed_url, args.log,
            args.timeout or env.timeout_seconds,
        )  # fmt: skip
        # SGLang runs in its own session: pass the pod's stop signal on, so it never outlives us.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: proc.returncode is None and proc.terminate())
        print(json.dumps({"state": outcome.state, "error": outcome.error, "canSeed": outcome.can_seed}), flush=True)
        if outcome.state != "verified":
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
            return 1
        return await proc.wait()

    return asyncio.run(run())


if __name__ == "__main__":
    import sys

    sys.exit(main())
