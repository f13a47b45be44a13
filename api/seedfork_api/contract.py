"""The pod contract: what the operator tells a pod and what the pod's agent reports back.

Every name that crosses the operator/agent boundary is defined here, once.

Static facts (never change for the life of a pod) travel as environment
variables, so an engine started by the agent can read them too. The dynamic
assignment (which seed, which attempt) and the agent's report live in pod
annotations, because a failed transfer is retried in the same pod with a new
assignment, and env vars cannot change after a pod is created. The agent reads
its own pod through the API and writes the report annotation; the operator
watches pods and turns a ``verified`` report into the readiness gate condition.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engines import ConcreteBackend
from .spec import GROUP, EngineSpec, Parallelism, TransferSpec

# ---- labels -------------------------------------------------------------
LABEL_SET = f"{GROUP}/set"  # owning ModelReplicaSet name
LABEL_FINGERPRINT = f"{GROUP}/fingerprint"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# A pod's role: a replica (counted, may become Ready and seed) or a warm standby (not Ready, never a seed, not
# behind a Service that selects role=replica). Promotion patches the label together with the new assignment.
LABEL_ROLE = f"{GROUP}/role"
ROLE_REPLICA = "replica"
ROLE_STANDBY = "standby"
MANAGED_BY = "seedfork-operator"

# ---- annotations --------------------------------------------------------
ANN_ASSIGNMENT = f"{GROUP}/assignment"  # JSON Assignment, written by the operator
ANN_REPORT = f"{GROUP}/report"  # JSON AgentReport, written by the agent
ANN_TIMING = f"{GROUP}/timing"  # JSON of phase timestamps, written by the agent
ANN_TOKEN_DIGEST = f"{GROUP}/token-digest"  # digest of the token the pod started with (never the token)

# ---- readiness gate -----------------------------------------------------
READINESS_GATE = f"{GROUP}/weights-ready"

# ---- failures the operator acts on (an AgentReport's error starts with one) -----
ERR_CHECKSUM_MISMATCH = "checksum mismatch"  # a client's pulled bytes differ from the seed's manifest
ERR_SELF_CHECK_FAILED = "self-check failed"  # a seed's own store no longer matches its manifest

# ---- token Secret -------------------------------------------------------
TOKEN_SECRET_KEY = "token"
TOKEN_PREVIOUS_KEY = "previous"  # after a rotation: the old token, accepted until no pod started with it is left

# ---- environment variables (static, set at pod creation) ---------------
ENV_POD_NAME = "SEEDFORK_POD_NAME"  # downward API: metadata.name
ENV_POD_NAMESPACE = "SEEDFORK_POD_NAMESPACE"  # downward API: metadata.namespace
ENV_POD_IP = "SEEDFORK_POD_IP"  # downward API: status.podIP
ENV_SET = "SEEDFORK_SET"
ENV_FINGERPRINT = "SEEDFORK_FINGERPRINT"
ENV_AGENT_PORT = "SEEDFORK_AGENT_PORT"
ENV_ENGINE_PORT = "SEEDFORK_ENGINE_PORT"
ENV_ENGINE = "SEEDFORK_ENGINE"
ENV_BACKEND = "SEEDFORK_BACKEND"
ENV_PROTOCOL = "SEEDFORK_PROTOCOL"
ENV_PORT_RANGE = "SEEDFORK_PORT_RANGE"  # "start-end"
ENV_MODEL_URI = "SEEDFORK_MODEL_URI"
ENV_TP = "SEEDFORK_TP"
ENV_PP = "SEEDFORK_PP"
ENV_TIMEOUT_SECONDS = "SEEDFORK_TIMEOUT_SECONDS"
ENV_BANDWIDTH_LIMIT_MBPS = "SEEDFORK_BANDWIDTH_LIMIT_MBPS"
ENV_MAX_CLIENTS_PER_SEED = "SEEDFORK_MAX_CLIENTS_PER_SEED"  # also caps the group creations a seed lets wait
ENV_TOKEN = "SEEDFORK_TOKEN"  # from a secretKeyRef, never a literal
ENV_TOKEN_PREVIOUS = "SEEDFORK_TOKEN_PREVIOUS"  # optional secretKeyRef: the token before a rotation
ENV_ENGINE_VERSION = "SEEDFORK_ENGINE_VERSION"  # part of the engine cache's key
ENV_ENGINE_CACHE_DIR = "SEEDFORK_ENGINE_CACHE_DIR"  # the engine's compile caches, shared by agent and engine

ALL_ENV = [
    ENV_POD_NAME,
    ENV_POD_NAMESPACE,
    ENV_POD_IP,
    ENV_SET,
    ENV_FINGERPRINT,
    ENV_AGENT_PORT,
    ENV_ENGINE_PORT,
    ENV_ENGINE,
    ENV_BACKEND,
    ENV_PROTOCOL,
    ENV_PORT_RANGE,
    ENV_MODEL_URI,
    ENV_TP,
    ENV_PP,
    ENV_TIMEOUT_SECONDS,
    ENV_BANDWIDTH_LIMIT_MBPS,
    ENV_MAX_CLIENTS_PER_SEED,
    ENV_TOKEN,
    ENV_TOKEN_PREVIOUS,
    ENV_ENGINE_VERSION,
]  # ENV_ENGINE_CACHE_DIR only where the engine compiles (vLLM, SGLang): render.engine_cache

# ---- the engine's compile caches (agent engine_cache) ----------------------
ENGINE_CACHE_PATH = "/var/cache/seedfork-engine"  # a volume of the pod, mounted in engine and agent
ENGINE_CACHE_VOLUME = "seedfork-engine-cache"


def engine_cache_env(engine: str, root: str) -> dict[str, str]:
    """Where an engine writes what it compiles, all under ``root`` so one directory holds it all.

    vLLM: its torch.compile cache, Inductor's generated kernels (C++ on CPU), Triton's GPU kernels.
    SGLang: its cache root, ``SGLANG_CACHE_DIR``. SGLang itself points Triton, Inductor, CUDA's JIT cache,
    TileLang and FlashInfer under it when it is imported, and keeps DeepGEMM's, CuTe DSL's and its
    torch.compile caches there (``sglang/srt/environ.py``, ``third_party_cache_defaults``), so setting it
    leaves a template's own choice of any of those in place. Its JIT kernel builds default to
    ``~/.cache/sglang/jit`` whatever the root (``kernels/jit/utils/compile/cache.py``): named too."""
    if engine == "sglang":
        return {"SGLANG_CACHE_DIR": f"{root}/sglang", "SGLANG_JIT_CACHE_DIR": f"{root}/sglang/jit"}
    return {
        "VLLM_CACHE_ROOT": f"{root}/vllm",
        "TORCHINDUCTOR_CACHE_DIR": f"{root}/inductor",
        "TRITON_CACHE_DIR": f"{root}/triton",
    }


# What an engine keeps in its cache root that holds for its own node only, never packed for another pod (paths
# relative to ``root``, fnmatch patterns): the GPU peer-to-peer access each engine probed on its node for its
# custom all-reduce (another node's answer could let it use P2P where that node has none), and SGLang's copies
# of model files streamed from object storage (weights, which only the verified pull moves).
ENGINE_CACHE_NODE_LOCAL: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm/gpu_p2p_access_cache_for_*",),
    "sglang": ("sglang/gpu_p2p_access_cache_for_*", "sglang/model_streamer/*"),
}


# ---- the set's transfer port range, shared out -------------------------
# Every listener of a pod except the agent's HTTP port and the engine's port lies in ``spec.transfer.ports``,
# so one NetworkPolicy can name them all. The top four ports per rank belong to Mooncake's TransferEngine (its
# RPC and TCP data listeners, which it places at random inside the range it is given: with only two, a pod's
# data listener found no free port in 5 of 5 tries on the shared-loopback local cluster while other pods used
# the same two); the ports below them are the rendezvous ports the operator hands out, one per rank per group.
TE_PORTS_PER_RANK = 4


def transfer_engine_ports(start: int, end: int, ranks: int = 1) -> tuple[int, int]:
    """The inclusive range TransferEngine listeners take inside the set's ``(start, end)``."""
    return end - TE_PORTS_PER_RANK * ranks + 1, end


def group_ports(start: int, end: int, ranks: int = 1) -> tuple[int, int]:
    """The inclusive range of rendezvous ports inside the set's ``(start, end)`` (may be empty: end < start)."""
    return start, transfer_engine_ports(start, end, ranks)[0] - 1


# ``queued``: no source yet. The operator expects a seed slot to free (or a storage slot, under the set's
# storage fan-in limit) sooner than storage would verify; the agent does nothing until its next assignment.
# ``standby``: no weights yet; the agent brings the engine up warm and waits (without bound) for a promotion, an
# assignment of a higher attempt that names a seed or storage.
Source = Literal["seed", "storage", "queued", "standby"]
# ``standby``: a standby's engine is up and warm, holding no weights; it is waiting for its promotion.
TransferState = Literal["pending", "transferring", "verified", "failed", "standby"]


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class Assignment(_Model):
    """Where a pod gets its weights from, for one attempt. Written by the operator."""

    attempt: int = Field(ge=1, description="1 for the first try; each retry increments it.")
    source: Source
    backend: ConcreteBackend | None = Field(default=None, description="Set when source is seed.")
    seed_pod: str | None = Field(default=None, alias="seedPod")
    seed_ip: str | None = Field(default=None, alias="seedIP")
    seed_agent_port: int | None = Field(default=None, alias="seedAgentPort")
    group_ports: list[int] = Field(
        default_factory=list,
        alias="groupPorts",
        description="NCCL: one rendezvous port per rank on the seed, disjoint per concurrent client/cohort.",
    )
    cohort_id: str | None = Field(default=None, alias="cohortId", description="NCCL cohort broadcast group.")
    cohort_rank: int | None = Field(default=None, alias="cohortRank", description="1..size-1; the seed is 0.")
    cohort_size: int | None = Field(default=None, alias="cohortSize", description="Seed plus clients.")
    excluded_seeds: list[str] = Field(
        default_factory=list, alias="excludedSeeds", description="Seeds that failed this pod before."
    )
    promotes: bool = Field(
        default=False, description="This attempt promotes a standby: the set refills its standbys once it ends."
    )
    assigned_at: float = Field(default_factory=time.time, alias="assignedAt")
    wait_until: float | None = Field(
        default=None,
        alias="waitUntil",
        description="Queued: the latest time (epoch seconds) the pod waits for a seed before it loads from storage.",
    )

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> Assignment | None:
        raw = (annotations or {}).get(ANN_ASSIGNMENT)
        return cls.model_validate_json(raw) if raw else None


class AgentReport(_Model):
    """What the agent reports for one attempt. Written by the agent onto its own pod."""

    attempt: int = Field(ge=0, description="The assignment attempt this report answers.")
    state: TransferState
    source: Source | None = None
    seed_pod: str | None = Field(default=None, alias="seedPod")
    backend: str | None = None
    bytes_done: int = Field(default=0, alias="bytesDone")
    bytes_total: int = Field(default=0, alias="bytesTotal")
    error: str | None = None
    serving: bool = Field(default=False, description="True once this pod serves weights to others.")
    active_clients: int = Field(default=0, alias="activeClients", description="Transfers this pod serves now.")
    fingerprint: str | None = None
    digest: str | None = Field(
        default=None,
        description="Manifest digest of the weights this pod verified; a set serves one digest (status.weightsDigest).",
    )
    self_checks: int = Field(
        default=0,
        alias="selfChecks",
        description="Re-checks of the store against its own manifest done after a client saw a checksum mismatch.",
    )
    updated_at: float = Field(default_factory=time.time, alias="updatedAt")

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> AgentReport | None:
        raw = (annotations or {}).get(ANN_REPORT)
        return cls.model_validate_json(raw) if raw else None


class PodTiming(_Model):
    """Phase timestamps (epoch seconds) recorded by the agent, for the time-to-Ready breakdown.

    In the order a pod passes them: ``started`` (agent process), ``engineStart`` / ``engineUp`` (the engine's
    process, then its API answering, warm and without weights), ``standbyWarm`` (a standby reported warm),
    ``assigned`` (the assignment that brought the weights: for a standby, its promotion), ``transferStart`` /
    ``transferEnd`` (weights), ``verified`` (the agent's checksums), ``engineAttached`` (the engine hook),
    ``engineVerified`` (the engine re-checked the weights inside itself and serves with them). The engine
    phases are read from engines that publish them (the reference engine).
    """

    started: float | None = None
    engine_start: float | None = Field(default=None, alias="engineStart")
    engine_up: float | None = Field(default=None, alias="engineUp")
    standby_warm: float | None = Field(default=None, alias="standbyWarm")
    assigned: float | None = None
    transfer_start: float | None = Field(default=None, alias="transferStart")
    transfer_end: float | None = Field(default=None, alias="transferEnd")
    verified: float | None = None
    engine_attached: float | None = Field(default=None, alias="engineAttached")
    # Engines that load from the store themselves (vLLM): when the first rank asked for the weights.
    engine_load_start: float | None = Field(default=None, alias="engineLoadStart")
    engine_verified: float | None = Field(default=None, alias="engineVerified")
    # The engine's compile cache fetched from the seed (before the weights are offered to the engine).
    cache_fetch_start: float | None = Field(default=None, alias="cacheFetchStart")
    cache_fetch_end: float | None = Field(default=None, alias="cacheFetchEnd")
    # When the engine's API first answered its health check: engine_attached -> engine_ready is the
    # engine's compile/warm-up (and KV cache) after it proved its weights.
    engine_ready: float | None = Field(default=None, alias="engineReady")
    bytes: int = 0


# ---- reading a pod's annotations: the one reading the operator, the agent and the dev harness share -----
def read_annotations(
    annotations: Mapping[str, str] | None,
) -> tuple[Assignment | None, AgentReport | None, PodTiming | None]:
    """The contract annotations of a pod. Unparseable ones read as absent (the operator then re-assigns the
    pod), so a hand-edited annotation cannot crash a reader."""
    annotations = annotations or {}
    try:
        assignment = Assignment.from_annotations(annotations)
    except ValidationError:
        assignment = None
    try:
        report = AgentReport.from_annotations(annotations)
    except ValidationError:
        report = None
    try:
        raw = annotations.get(ANN_TIMING)
        timing = PodTiming.model_validate_json(raw) if raw else None
    except ValidationError:
        timing = None
    return assignment, report, timing


def current_report(assignment: Assignment | None, report: AgentReport | None) -> AgentReport | None:
    """The agent's report for the current attempt; an older report says nothing about it."""
    if assignment is None or report is None or report.attempt != assignment.attempt:
        return None
    return report


def superseded_but_verified(assignment: Assignment | None, report: AgentReport | None) -> bool:
    """The agent verified an earlier attempt just as the operator moved on (seed judged gone, closer seed).

    Verified weights are verified whatever attempt brought them, and an agent that already serves
    takes no new attempt, so waiting for the newer one would hang the pod until it timed out.
    """
    r, a = report, assignment
    return r is not None and a is not None and r.state == "verified" and 1 <= r.attempt < a.attempt


def weights_report(assignment: Assignment | None, report: AgentReport | None) -> AgentReport | None:
    """The report that says how far the pod's weights are: the current attempt's, or a superseded one that
    verified; None when the agent has not answered the current attempt."""
    if superseded_but_verified(assignment, report):
        return report
    return current_report(assignment, report)


# The spec's defaults, for a pod rendered without a value (never restated as literals here).
_TRANSFER = TransferSpec()
_PARALLELISM = Parallelism()
_ENGINE_PORT: int = EngineSpec.model_fields["port"].default


class EngineEnv(_Model):
    """What an engine or engine hook started by the agent reads from the pod contract: where the engine
    and the agent listen, how long any wait may take, and the token."""

    pod_ip: str
    engine_port: int = _ENGINE_PORT
    agent_port: int = _TRANSFER.agent_port
    timeout_seconds: float = float(_TRANSFER.timeout_seconds)
    token: str | None = None

    # The variable each field is read from.
    ENV: ClassVar[dict[str, str]] = {
        "pod_name": ENV_POD_NAME,
        "namespace": ENV_POD_NAMESPACE,
        "pod_ip": ENV_POD_IP,
        "set_name": ENV_SET,
        "fingerprint": ENV_FINGERPRINT,
        "agent_port": ENV_AGENT_PORT,
        "engine_port": ENV_ENGINE_PORT,
        "engine": ENV_ENGINE,
        "backend": ENV_BACKEND,
        "protocol": ENV_PROTOCOL,
        "port_range": ENV_PORT_RANGE,
        "model_uri": ENV_MODEL_URI,
        "tp": ENV_TP,
        "pp": ENV_PP,
        "timeout_seconds": ENV_TIMEOUT_SECONDS,
        "bandwidth_limit_mbps": ENV_BANDWIDTH_LIMIT_MBPS,
        "max_clients_per_seed": ENV_MAX_CLIENTS_PER_SEED,
        "token": ENV_TOKEN,
        "token_previous": ENV_TOKEN_PREVIOUS,
        "engine_version": ENV_ENGINE_VERSION,
        "engine_cache_dir": ENV_ENGINE_CACHE_DIR,
    }
    # Read as unset when empty: optional values (a secretKeyRef that may be absent renders as "").
    EMPTY_IS_UNSET: ClassVar[frozenset[str]] = frozenset(
        {"model_uri", "bandwidth_limit_mbps", "token", "token_previous", "engine_cache_dir"}
    )
    REQUIRED: ClassVar[tuple[str, ...]] = ("pod_ip", "engine_port")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, required: tuple[str, ...] | None = None) -> Self:
        """Parse the contract from the environment; a missing or malformed variable is an error naming it.
        ``required``: the fields this reader cannot do without, when not the class's ``REQUIRED``."""
        env = os.environ if environ is None else environ
        missing = [cls.ENV[f] for f in (cls.REQUIRED if required is None else required) if not env.get(cls.ENV[f])]
        if missing:
            raise ValueError(f"pod contract incomplete: missing environment variables {', '.join(missing)}")
        values: dict[str, Any] = {}
        for field in cls.model_fields:
            raw = env.get(cls.ENV[field])
            if raw is None or (raw == "" and field in cls.EMPTY_IS_UNSET):
                continue
            values[field] = _port_range(raw) if field == "port_range" else raw
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            bad = ", ".join(f"{cls.ENV[str(err['loc'][0])]}: {err['msg']}" for err in e.errors())
            raise ValueError(f"pod contract malformed: {bad}") from None


def _port_range(raw: str) -> tuple[str, str] | str:
    start, sep, end = raw.partition("-")
    return (start, end) if sep else raw  # no "-": let validation name the variable


class PodEnv(EngineEnv):
    """The static part of the contract, as the agent reads it from its environment."""

    pod_name: str
    namespace: str
    pod_ip: str = "127.0.0.1"  # outside a pod (no downward API): loopback
    set_name: str
    fingerprint: str = ""
    engine: str = "reference"  # the spec requires a kind; a bare agent runs the reference engine
    backend: str = _TRANSFER.backend
    protocol: str = _TRANSFER.protocol
    port_range: tuple[int, int] = (_TRANSFER.ports.start, _TRANSFER.ports.end)
    model_uri: str | None = None
    tp: int = _PARALLELISM.tp
    pp: int = _PARALLELISM.pp
    bandwidth_limit_mbps: int | None = _TRANSFER.bandwidth_limit_mbps
    max_clients_per_seed: int = _TRANSFER.max_clients_per_seed
    token: str
    token_previous: str | None = None
    engine_version: str = ""
    engine_cache_dir: str | None = None

    REQUIRED: ClassVar[tuple[str, ...]] = ("pod_name", "namespace", "set_name", "token")


def sglang_own_ports(port_range: tuple[int, int]) -> tuple[int, int]:
    """(dist-init, engine-info bootstrap): the ports each SGLang pod binds for itself, the top two of the set's
    range (SGLang's ``own_ports`` in ``engines.ENGINES``). The operator hands out group ports only below them
    (``planner.port_blocks``)."""
    end = port_range[1]
    return end, end - 1


def annotation_patch(**values: _Model | None) -> dict[str, dict[str, str | None]]:
    """A merge patch setting contract annotations, e.g. ``annotation_patch(report=r)``."""
    keys = {"assignment": ANN_ASSIGNMENT, "report": ANN_REPORT, "timing": ANN_TIMING}
    return {"metadata": {"annotations": {keys[k]: (v.to_json() if v is not None else None) for k, v in values.items()}}}
