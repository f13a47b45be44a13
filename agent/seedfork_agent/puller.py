"""The client side: pull a seed's weights into a new store and verify them.

Order of events, each with a time limit: fetch the manifest (or use an expected
manifest when the seed is a stock SGLang instance without one), refuse on a
fingerprint mismatch before any byte moves, allocate, transfer (R-Fork NCCL/gloo
group or TransferEngine one-sided reads), verify every checksum. Any failure
frees what was allocated and registered and raises ``PullError`` with the reason.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import torch

from seedfork_api.contract import ERR_CHECKSUM_MISMATCH

from . import groups, plainhttp
from .store import ALIGN, Manifest, WeightStore, resolve_device
from .te import TransferEngineHandle

log = logging.getLogger("seedfork.agent.puller")

# One batch_transfer_sync_read per pull, as SGLang does. With Mooncake's metadata cache off (te.py) each request
# looks the seed's segment up again; reads are coalesced when the seed is one of our agents (see _coalesce).
# A pull reads once, then verifies. Verifying each chunk while the next one moved was measured twice on 2xH200
# and did not pay: with synchronous chunk reads the per-chunk set-up ate the gain; with every chunk submitted at
# once and one checksum kernel per landed chunk on a side stream, the copies slowed from 386-392 to 335-350 GB/s
# while kernels ran, and the full pull went 71 -> 77 ms (16 GB) and 238-256 -> 237 ms (65 GB): a wash.


class PullError(RuntimeError):
    """A pull failed; the message is the reason reported on the pod."""


@dataclass
class PullRequest:
    seed_ip: str
    seed_port: int
    token: str
    backend: str  # "nccl" (gloo on CPU) or "transfer_engine"
    fingerprint: str
    group_ports: list[int] = field(default_factory=list)
    client_id: str = ""  # the <id> in SGLang's group name send_weights_<id>
    cohort_id: str | None = None
    cohort_rank: int | None = None
    cohort_size: int | None = None
    timeout_s: float = 300.0
    device: str = "cpu"
    expected: Manifest | None = None  # for seeds that publish no manifest (stock SGLang)
    local_ip: str | None = None  # this pod's IP: the group member's own listener binds it
    token_previous: str | None = None  # presented when the seed refuses ``token``: it started before a rotation

    @property
    def base_url(self) -> str:
        return f"http://{self.seed_ip}:{self.seed_port}"

    @property
    def seed(self) -> str:
        return f"{self.seed_ip}:{self.seed_port}"


def pull(
    req: PullRequest,
    te_factory: Callable[[], TransferEngineHandle] | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
    stats: dict[str, float] | None = None,
    abort: Callable[[], str | None] | None = None,
) -> WeightStore:
    """Pull and verify; returns a verified store (registered with TE when TE was used).

    ``stats``, when given, receives the phase durations (seconds) and the transfer's wall-clock window.
    ``abort``, when given, is asked while a group forms; a reason (e.g. a newer assignment) ends the pull.
    """
    stats = {} if stats is None else stats
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stats[name] = now - mark
        mark = now

    deadline = time.monotonic() + req.timeout_s
    if req.device.startswith("cuda"):
        torch.cuda.set_device(resolve_device(req.device))  # runs in a worker thread: make its CUDA context current
    headers = {"Authorization": f"Bearer {req.token}"}
    timeout = min(30.0, req.timeout_s)
    tls = plainhttp.verify(req.base_url)
    with (
        httpx.Client(base_url=req.base_url, headers=headers, timeout=timeout, verify=tls) as http,
        ThreadPoolExecutor(1, thread_name_prefix="seedfork-pull-http") as background,
    ):
        manifest = fetch_manifest(http, req)
        seed_is_agent = manifest is not req.expected  # stock SGLang seeds publish no manifest
        check_identity(manifest, req)
        phase("manifest_s")
        te_info = None
        if req.backend == "transfer_engine":
            # The seed's pointers and the start announcement travel while this side allocates.
            te_info = background.submit(_te_info_and_announce, http, req)
        store = None
        te: TransferEngineHandle | None = None
        try:
            store = WeightStore.empty(manifest, req.device)
            if store.device.type == "cpu":
                store.buffer.zero_()  # fault the shared-memory pages in now, not inside the transport's receive path
            phase("alloc_s")
            done = 0

            def progress(n: int) -> None:
                nonlocal done
                done += n
                if on_bytes:
                    on_bytes(done, manifest.payload_bytes)

            progress(0)
            if req.backend == "transfer_engine":
                if te_factory is None:
                    raise PullError("TransferEngine is not available in this agent")
                te = te_factory()
                te.register(store.buffer.data_ptr(), store.nbytes)
                phase("register_s")
                _pull_te(te_info.result(), req, store, te, progress, stats, coalesce=seed_is_agent)
                # Best effort and off the critical path (the executor's exit waits for it before returning).
                background.submit(_announce, http, req, "done", manifest.payload_bytes)
                te_info = None  # the read is over and announced
            elif req.backend in ("nccl", "gloo"):
                _pull_group(http, req, store, progress, deadline, stats, abort)
            else:
                raise PullError(f"unknown backend {req.backend!r}")
            phase("transfer_s")
            if time.monotonic() > deadline:
                raise PullError(f"transfer from {req.seed} exceeded its {req.timeout_s:.0f}s timeout")
            bad = store.verify(manifest)
            phase("verify_s")
            if bad:
                if seed_is_agent:
                    _ask_selfcheck(http)  # the seed's store may be what is wrong: it re-checks and stops if so
                raise PullError(
                    f"{ERR_CHECKSUM_MISMATCH} in {len(bad)} of {len(manifest.tensors)} tensors, first {bad[0]}"
                )
            return store
        except BaseException as e:
            if store is not None:
                if te is not None:
                    te.unregister(store.buffer.data_ptr())
                store.close()
            if te_info is not None and not te_info.cancel() and _te_info_outcome(te_info) is not None:
                _announce(http, req, "failed")  # the seed was told a read started, and it ended here
            if isinstance(e, PullError):
                raise
            raise PullError(f"transfer from {req.seed} over {req.backend} failed: {type(e).__name__}: {e}") from e


def fetch_manifest(http: httpx.Client, req: PullRequest) -> Manifest:
    try:
        r = http.get("/v1/manifest")
        if r.status_code == 401 and req.token_previous:
            http.headers["Authorization"] = f"Bearer {req.token_previous}"  # every later request of this pull too
            r = http.get("/v1/manifest")
    except httpx.HTTPError as e:
        raise PullError(f"seed {req.seed} unreachable: {type(e).__name__}: {e}") from None
    if r.status_code == 401:
        raise PullError(f"seed {req.seed} rejected the token (401)")
    if r.status_code == 404 and req.expected is not None:
        return req.expected  # a stock SGLang seed has no manifest endpoint
    if r.status_code != 200:
        raise PullError(f"seed {req.seed} answered {r.status_code} for its manifest: {r.text[:200]}")
    try:
        manifest = Manifest.from_dict(r.json())
    except ValueError as e:
        raise PullError(f"seed {req.seed} sent a bad manifest: {e}") from None
    if req.expected is not None and manifest.digest != req.expected.digest:
        raise PullError(f"seed {req.seed} holds other weights (digest {manifest.digest[:12]})")
    return manifest


def check_identity(manifest: Manifest, req: PullRequest) -> None:
    """Two pods exchange weights only when their identity fingerprints are equal."""
    if not req.fingerprint:
        raise PullError("no identity fingerprint to check the seed against")
    if manifest.fingerprint != req.fingerprint:
        raise PullError(f"fingerprint mismatch: seed has {manifest.fingerprint}, this pod needs {req.fingerprint}")


# ---- NCCL / gloo: SGLang R-Fork group protocol ------------------------------
def _pull_group(
    http: httpx.Client,
    req: PullRequest,
    store: WeightStore,
    progress,
    deadline: float,
    stats: dict,
    abort: Callable[[], str | None] | None = None,
) -> None:
    if len(req.group_ports) != 1:
        raise PullError(f"need exactly one group port (tp 1), got {req.group_ports}")
    port = req.group_ports[0]
    cohort = req.cohort_id is not None
    ident = f"cohort-{req.cohort_id}" if cohort else (req.client_id or _local_ip_for(req.seed_ip))
    base = f"send_weights_{ident}"
    world = req.cohort_size if cohort else 2
    rank = req.cohort_rank if cohort else 1
    if not world or not rank or not 1 <= rank < world:
        raise PullError(f"bad cohort rank {rank} of size {world}")
    remaining = max(1.0, deadline - time.monotonic())
    body = {
        "master_address": req.seed_ip,
        "ports": str(port),
        "group_rank": 0,
        "world_size": world,
        "group_name": base,
        "backend": "nccl",
    }
    device = store.device
    backend = groups.local_backend("nccl", device)
    pg = None
    # Not a with-block: leaving must not wait for an init call the seed has not answered (an aborted join).
    pool = ThreadPoolExecutor(2, thread_name_prefix="seedfork-pull-group")
    try:
        # The seed answers the init call only after every member joined: send it while we join.
        init = pool.submit(_post, http, "/init_weights_send_group_for_remote_instance", body, remaining)

        def refused() -> str | None:  # the seed answers once all joined; a failed answer before that ends the join
            return (_result_error(init, 0) if init.done() else None) or (abort() if abort else None)

        try:
            pg = groups.init_group(
                backend, req.seed_ip, port, world, rank, groups.group_name(base, port, 0), remaining, device, refused,
                local_host=req.local_ip,
            )  # fmt: skip
        except Exception as e:
            # Our own reason (a newer assignment) at once; else the seed's, which comes with the failure.
            err = (abort() if abort else None) or _result_error(init, 5.0)
            raise PullError(f"joining group {base} at {req.seed_ip}:{port} failed: {err or e}") from None
        try:
            _check_rfork(init.result(timeout=max(1.0, deadline - time.monotonic())), "init group")
            send_body = {"master_address": req.seed_ip, "ports": str(port), "group_name": base}
            send = pool.submit(
                _post, http, "/send_weights_to_remote_instance", send_body, max(1.0, deadline - time.monotonic())
            )
            tensors = [store.tensor(t.name) for t in store.manifest.tensors]
            try:
                stats["data_start"] = time.time()
                groups.broadcast_tensors(pg, tensors, progress)
                stats["data_end"] = time.time()
            except Exception as e:
                err = _result_error(send, 2.0)
                raise PullError(f"receiving weights from {req.seed} failed: {err or e}") from None
            _check_rfork(send.result(timeout=max(1.0, deadline - time.monotonic())), "send weights")
        finally:
            groups.destroy_group(pg)
    finally:
        pool.shutdown(wait=False)


def _post(http: httpx.Client, path: str, body: dict, timeout: float) -> httpx.Response:
    return http.post(path, json=body, timeout=timeout)


def _result_error(future, timeout: float) -> str | None:
    """The seed's own reason, if its HTTP answer came back failed."""
    try:
        r = future.result(timeout=timeout)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if r.status_code == 401:
        return f"seed rejected the token (401) on {r.request.url.path}"
    if r.status_code != 200:
        return f"seed answered {r.status_code}: {r.text[:200]}"
    return None


def _check_rfork(r: httpx.Response, what: str) -> None:
    if r.status_code == 401:
        raise PullError(f"seed rejected the token (401) on {what}")
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code != 200 or not body.get("success"):
        raise PullError(f"seed failed to {what}: {body.get('message') or r.text[:200]}")


def _local_ip_for(peer: str) -> str:
    """The address this host uses to reach the peer (SGLang names groups after the client's IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


# ---- TransferEngine: one-sided reads -----------------------------------------
def _te_info_and_announce(http: httpx.Client, req: PullRequest) -> tuple[str, dict]:
    """The seed's TransferEngine session and tensor pointers, then the start announcement (best effort)."""
    # Pointers die with the seed process: fetch them fresh for every transfer, never reuse them.
    try:
        r = http.get("/remote_instance_transfer_engine_info", params={"rank": 0})
    except httpx.HTTPError as e:
        raise PullError(f"seed {req.seed} unreachable for TransferEngine info: {e}") from None
    if r.status_code == 401:
        raise PullError(f"seed {req.seed} rejected the token (401)")
    if r.status_code != 200:
        raise PullError(f"seed {req.seed} has no TransferEngine info: {r.status_code} {r.text[:200]}")
    try:
        session_id, remote = r.json()["remote_instance_transfer_engine_info"]
    except (ValueError, KeyError, TypeError):
        raise PullError(f"seed {req.seed} sent malformed TransferEngine info") from None
    _announce(http, req, "start")
    return session_id, remote


def _te_info_outcome(te_info) -> tuple[str, dict] | None:
    """After a failed pull: the info if it was fetched (so "start" was announced), else None."""
    try:
        return te_info.result()
    except Exception:
        return None


def _pull_te(
    te_info: tuple[str, dict],
    req: PullRequest,
    store: WeightStore,
    te: TransferEngineHandle,
    progress,
    stats: dict,
    coalesce: bool,
) -> None:
    session_id, remote = te_info
    reads = []  # (local, remote, nbytes) per tensor, in manifest order
    for t in store.manifest.tensors:
        info = remote.get(t.name)
        if info is None:
            raise PullError(f"seed {req.seed} does not offer tensor {t.name}")
        ptr, numel, elsize = (int(x) for x in info)
        if numel != t.numel or elsize != t.element_size:
            raise PullError(f"tensor {t.name}: seed has {numel}x{elsize} bytes, expected {t.numel}x{t.element_size}")
        reads.append((store.data_ptr(t.name), ptr, t.nbytes))
    payload = sum(n for _, _, n in reads)  # tensor bytes: what progress and the seed's byte counters report
    local, remote_ptrs, lengths = ([r[i] for r in reads if r[2]] for i in range(3))  # Mooncake rejects 0 bytes
    if coalesce:
        local, remote_ptrs, lengths = _coalesce(local, remote_ptrs, lengths)
    stats["data_start"] = time.time()
    try:
        te.read(session_id, local, remote_ptrs, lengths)
    finally:
        if store.device.type == "cuda":
            # The NVLink transport queues cudaMemcpy on the legacy stream and may return before the bytes land:
            # wait for them, also before a failed pull frees the store.
            torch.cuda.synchronize(store.device)
    progress(payload)
    stats["data_end"] = time.time()


def _coalesce(local: list[int], remote: list[int], lengths: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Merge neighbouring reads whose gaps match on both sides into one read (padding included).

    Our seed's store has our layout in one registered buffer, so a pull becomes one read instead of one
    per tensor: Mooncake looks the seed's segment up again for every request while its metadata cache is
    off. Only for our own seeds: a stock seed may register each tensor apart, and a read must not span two.
    """
    out_local, out_remote, out_len = local[:1], remote[:1], lengths[:1]
    for lo, re, n in zip(local[1:], remote[1:], lengths[1:], strict=True):
        gap = lo - (out_local[-1] + out_len[-1])
        if 0 <= gap < ALIGN and re - out_remote[-1] == lo - out_local[-1]:
            out_len[-1] = lo + n - out_local[-1]
        else:
            out_local.append(lo)
            out_remote.append(re)
            out_len.append(n)
    return out_local, out_remote, out_len


def _ask_selfcheck(http: httpx.Client) -> None:
    """Best effort: the pull goes on to another seed whatever the answer."""
    try:
        http.post("/v1/selfcheck", timeout=5)
    except httpx.HTTPError as e:
        log.warning("could not ask the seed to check its store: %s", e)


def _announce(http: httpx.Client, req: PullRequest, event: str, nbytes: int = 0) -> None:
    """Best effort: tell our own seed about a one-sided read (stock SGLang seeds lack the endpoint)."""
    try:
        http.post("/v1/transfers", json={"client": req.client_id or "anon", "event": event, "bytes": nbytes}, timeout=5)
    except httpx.HTTPError:
        pass
