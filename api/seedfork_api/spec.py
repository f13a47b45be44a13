"""The ModelReplicaSet API (seedfork.io/v1alpha1) as pydantic models.

These models are the one source of truth: the CRD's OpenAPI schema, defaults
and CEL rules are generated from them (``seedfork_api.crd``), the operator
parses custom resources with them, and the agent reads the same identity.
Field names are camelCase on the wire, as Kubernetes APIs are.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from . import engines

GROUP = "seedfork.io"
VERSION = "v1alpha1"
KIND = "ModelReplicaSet"
PLURAL = "modelreplicasets"
SINGULAR = "modelreplicaset"
SHORT_NAMES = ["mrs"]
API_VERSION = f"{GROUP}/{VERSION}"

EngineKind = Literal[tuple(engines.ENGINES)]  # one per row of the engine table
Backend = Literal["transfer_engine", "nccl", "auto"]
TransportProtocol = Literal["auto", "tcp", "rdma", "nvlink_intra"]
Fallback = Literal["storage", "fail"]
Dtype = Literal["bfloat16", "float16", "float32", "float8_e4m3fn"]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

MAX_STANDBY = 100


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL validation rule, rendered into ``x-kubernetes-validations``."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class ApiModel(BaseModel):
    """Base: camelCase aliases, populate by either name, reject unknown fields."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False)

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelIdentity(ApiModel):
    """Which weights: together with the engine this defines the identity fingerprint."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Model name, e.g. meta-llama/Llama-3.1-8B-Instruct.",
    )
    revision: str = Field(default="main", min_length=1, max_length=128, description="Model revision.")
    dtype: Dtype = Field(default="bfloat16", description="Weight dtype as served.")
    quantization: str = Field(default="none", min_length=1, max_length=64, description="Quantization method, or none.")
    uri: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "Where the weights live on storage (a directory of safetensors files inside the pod). "
            "Used by the first replica and whenever no seed can serve."
        ),
    )


class Parallelism(ApiModel):
    tp: int = Field(default=1, ge=1, le=64, description="Tensor parallel size.")
    pp: int = Field(default=1, ge=1, le=64, description="Pipeline parallel size.")


class EngineSpec(ApiModel):
    kind: EngineKind = Field(description="Inference engine: sglang, vllm or reference (seedfork's demo engine).")
    version: str = Field(default="", max_length=64, description="Engine version; part of the fingerprint.")
    port: int = Field(default=30000, ge=1024, le=65535, description="The engine's HTTP port in the pod.")
    parallelism: Parallelism = Field(default_factory=Parallelism)


class PortRange(ApiModel):
    # The default range sits below Linux's ephemeral ports (32768-60999): a listening port in that range can
    # collide with the local port of any outgoing connection in the pod, and then the bind fails even with
    # SO_REUSEADDR (seen as a failed NCCL cohort when pods shared one host's network in tests).
    start: int = Field(default=28000, ge=1024, le=65535)
    end: int = Field(default=28099, ge=1024, le=65535)

    @property
    def size(self) -> int:
        return self.end - self.start + 1


class TransferSpec(ApiModel):
    # Policy fields a cluster admin may default for every set (the operator's transfer defaults, chart value
    # ``transferDefaults``). The CRD gives them no admission default, so the operator can tell "unset" (the
    # admin's default, else the value here) from a value the user chose.
    CLUSTER_DEFAULTED: ClassVar[tuple[str, ...]] = (
        "backend",
        "protocol",
        "max_clients_per_seed",
        "timeout_seconds",
        "retries",
        "fallback",
        "max_concurrent_storage_loads",
        "topology_keys",
        "bandwidth_limit_mbps",
    )

    backend: Backend = Field(
        default="auto",
        description="transfer_engine (one-sided reads), nccl (broadcast), or auto (transfer_engine when available).",
    )
    protocol: TransportProtocol = Field(
        default="auto",
        description="TransferEngine transport: tcp, rdma, nvlink_intra, or auto-detect.",
    )
    max_clients_per_seed: int = Field(default=4, ge=1, le=256, description="How many pods one seed serves at once.")
    timeout_seconds: int = Field(
        default=300, ge=1, le=86400, description="A transfer that takes longer is failed and retried."
    )
    retries: int = Field(default=2, ge=0, le=20, description="Other seeds to try after a failed transfer.")
    fallback: Fallback = Field(
        default="storage",
        description="When no seed can serve or retries run out: load from storage, or fail the pod.",
    )
    max_concurrent_storage_loads: int = Field(
        default=2,
        ge=1,
        le=1000,
        description=(
            "How many pods of the set load from storage at once, so a burst cannot stampede shared storage; "
            "the others wait for a seed or a storage slot, whichever is expected sooner."
        ),
    )
    agent_port: int = Field(default=18080, ge=1024, le=65535, description="The agent's HTTP port.")
    ports: PortRange = Field(
        default_factory=PortRange,
        description="Ports for transfer groups (NCCL rendezvous, TransferEngine RPC) in each pod.",
    )
    topology_keys: list[str] = Field(
        default_factory=lambda: ["kubernetes.io/hostname", "topology.kubernetes.io/zone"],
        max_length=8,
        description="Node labels in order of preference: a seed sharing the first is best.",
    )
    bandwidth_limit_mbps: int | None = Field(
        default=None, ge=1, description="Optional cap on the bytes a seed serves per second (MB/s)."
    )
    token_secret_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_LABEL[:-1] + r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Secret (key: token) guarding the weight endpoints; created by the operator if unset.",
    )


def resolve_transfer(transfer: TransferSpec, defaults: TransferSpec | None, engine_kind: str) -> TransferSpec:
    """The policy a set runs with: what its spec sets, else the cluster's default, else the built-in one.

    An engine whose seeds serve fewer NCCL clients at once (``engines.Engine.nccl_max_clients``: SGLang, one)
    gets its limit unless the spec itself says otherwise (which ``transfer_problem`` then reports).
    """
    chosen = transfer.model_dump(include=transfer.model_fields_set)
    if defaults is not None:
        admin = defaults.model_dump(include=defaults.model_fields_set & set(TransferSpec.CLUSTER_DEFAULTED))
        chosen = {**admin, **chosen}
    merged = TransferSpec.model_validate(chosen)
    if "max_clients_per_seed" not in transfer.model_fields_set:
        backend = engines.resolve_backend(merged.backend, engine_kind)
        merged.max_clients_per_seed = engines.of(engine_kind).client_limit(backend, merged.max_clients_per_seed)
    return merged


# Mooncake's TransferEngine ignores a listen port range that overlaps Linux's default ephemeral ports.
MOONCAKE_REFUSED_PORTS = (32768, 60999)


def transfer_problem(spec: ModelReplicaSetSpec) -> str | None:
    """What the resolved policy asks that the engine cannot do (the CRD's CEL rules see only explicit values).

    The same rows of ``engines.ENGINES`` as the CEL rules (``spec_rules``), applied to the resolved backend."""
    t, e = spec.transfer, spec.engine
    engine, backend = engines.of(e.kind), engines.resolve_backend(t.backend, e.kind)
    pp, clients, own = engine.te_max_pp, engine.nccl_max_clients, engine.own_ports
    if backend == "transfer_engine" and pp is not None and e.parallelism.pp > pp.most:
        return (
            f"backend {t.backend} (resolves to {backend}) needs engine.parallelism.pp {pp.bound} for engine "
            f"{e.kind}; set spec.transfer.backend: nccl or pp: {pp.most}"
        )
    if backend == "nccl" and clients is not None and t.max_clients_per_seed > clients.most:
        return f"transfer.maxClientsPerSeed must be {clients.bound} for engine {e.kind} with backend nccl"
    lo, hi = MOONCAKE_REFUSED_PORTS
    if engine.agent_moves_bytes and backend == "transfer_engine" and t.ports.start <= hi and t.ports.end >= lo:
        return (
            f"transfer.ports {t.ports.start}-{t.ports.end} overlaps {lo}-{hi}, where Mooncake's TransferEngine "
            f"will not listen (backend {t.backend} resolves to {backend}); move spec.transfer.ports below {lo}"
        )
    if own is not None and t.ports.size < e.parallelism.tp * e.parallelism.pp + own.count:
        return (
            f"transfer.ports holds {t.ports.size} ports; engine {e.kind} needs one per rank (tp * pp) plus "
            f"{own.count} that each of its pods binds for itself ({own.what})"
        )
    return None


def _is(engine: engines.Engine) -> str:
    return f"self.engine.kind == '{engine.kind}'"


def _te_pp_rule(engine: engines.Engine, pp: engines.Limit) -> dict[str, str]:
    return cel(
        f"!({_is(engine)} && has(self.transfer.backend) && self.transfer.backend == 'transfer_engine' "
        f"&& self.engine.parallelism.pp > {pp.most})",
        f"engine.parallelism.pp must be {pp.bound} for engine {engine.kind} with backend transfer_engine ({pp.why})",
        ".engine.parallelism.pp",
    )


def _nccl_clients_rule(engine: engines.Engine, clients: engines.Limit) -> dict[str, str]:
    return cel(
        f"!({_is(engine)} && has(self.transfer.backend) && self.transfer.backend == 'nccl' "
        f"&& has(self.transfer.maxClientsPerSeed) && self.transfer.maxClientsPerSeed > {clients.most})",
        f"transfer.maxClientsPerSeed must be {clients.bound} for engine {engine.kind} with backend nccl "
        f"({clients.why})",
        ".transfer.maxClientsPerSeed",
    )


def _uri_rule(engine: engines.Engine) -> dict[str, str]:
    return cel(
        f"self.engine.kind != '{engine.kind}' || has(self.model.uri)",
        f"model.uri is required for engine {engine.kind} (the first replica loads the weights from it)",
        ".model.uri",
    )


def _ranks_rule(engine: engines.Engine, ranks: engines.Limit) -> dict[str, str]:
    what = "tp and pp must be 1" if ranks.most == 1 else f"tp * pp must be {ranks.bound}"
    ranks_used = "self.engine.parallelism.tp * self.engine.parallelism.pp"
    return cel(
        f"self.engine.kind != '{engine.kind}' || {ranks_used} <= {ranks.most}",
        f"engine.parallelism {what} for engine {engine.kind} ({ranks.why})",
        ".engine.parallelism",
    )


def _standby_designs(kinds: list[str]) -> str:
    """Where the refusal's reader finds what a standby of these engines would be, and why it is not built."""
    designs = [f"for {k} see {engines.of(k).standby_design}" for k in kinds if engines.of(k).standby_design]
    return f" ({'; '.join(designs)})" if designs else ""


def _standby_rules() -> list[dict[str, str]]:
    built = engines.standby_kinds()
    others = sorted(set(engines.ENGINES) - set(built))
    if not others:
        return []
    return [
        cel(
            "!has(self.standby) || self.standby == 0 || self.engine.kind in ["
            + ", ".join(f"'{e}'" for e in built)
            + "]",
            f"spec.standby must be 0 for engine {' or '.join(others)}: standby replicas are built for engine "
            f"{' and '.join(built)} only" + _standby_designs(others),
            ".standby",
        )
    ]


# Rules that hold for every engine: where the set's ports lie.
PORT_RULES = [
    cel(  # the layout of the range: seedfork_api.contract.transfer_engine_ports
        "self.transfer.ports.end - self.transfer.ports.start + 1 >= "
        "5 * self.engine.parallelism.tp * self.engine.parallelism.pp",
        "transfer.ports must hold at least one port per rank (tp * pp) for rendezvous "
        "plus four per rank for TransferEngine",
        ".transfer.ports",
    ),
    cel(
        "self.transfer.agentPort < self.transfer.ports.start || self.transfer.agentPort > self.transfer.ports.end",
        "transfer.agentPort must lie outside transfer.ports",
        ".transfer.agentPort",
    ),
    cel(
        "self.engine.port != self.transfer.agentPort",
        "engine.port and transfer.agentPort must differ",
        ".engine.port",
    ),
    cel(
        "self.engine.port < self.transfer.ports.start || self.engine.port > self.transfer.ports.end",
        "engine.port must lie outside transfer.ports",
        ".engine.port",
    ),
]


def spec_rules() -> list[dict[str, str]]:
    """The spec's CEL rules: the engine-specific ones generated from ``engines.ENGINES``, one per row and limit."""
    rows = list(engines.ENGINES.values())
    return [
        *(_te_pp_rule(e, e.te_max_pp) for e in rows if e.te_max_pp),
        *(_nccl_clients_rule(e, e.nccl_max_clients) for e in rows if e.nccl_max_clients),
        *PORT_RULES,
        *(_uri_rule(e) for e in rows if e.needs_uri),
        *_standby_rules(),
        *(_ranks_rule(e, e.max_ranks) for e in rows if e.max_ranks),
    ]


SPEC_RULES = spec_rules()

# The set's name is the value of the seedfork.io/set label on its pods and Secret, and labels hold 63 characters.
MAX_SET_NAME = 63
ROOT_RULES = [
    cel(
        f"size(self.metadata.name) <= {MAX_SET_NAME}",
        f"metadata.name must be at most {MAX_SET_NAME} characters: it is the value of the seedfork.io/set label",
    ),
    # One set, one digest: other bytes behind the same identity would mix two models in one set. Until the
    # first load is verified the URI may still change (a typo in it is fixed in place).
    cel(
        "!has(oldSelf.status) || !has(oldSelf.status.weightsDigest) || oldSelf.status.weightsDigest == '' || "
        "(has(self.spec.model.uri) == has(oldSelf.spec.model.uri) && "
        "(!has(self.spec.model.uri) || self.spec.model.uri == oldSelf.spec.model.uri))",
        "spec.model.uri is immutable once the set has verified weights (status.weightsDigest); "
        "create a new ModelReplicaSet to serve other weights",
        ".spec.model.uri",
    ),
]

PORT_RANGE_RULES = [cel("self.end >= self.start", "ports.end must not be below ports.start")]
MODEL_RULES = [
    cel(
        "self.name == oldSelf.name && self.revision == oldSelf.revision && self.dtype == oldSelf.dtype "
        "&& self.quantization == oldSelf.quantization",
        "model identity (name, revision, dtype, quantization) is immutable; "
        "create a new ModelReplicaSet to serve other weights",
    )
]
ENGINE_RULES = [
    cel(
        "self.kind == oldSelf.kind && self.version == oldSelf.version && self.parallelism == oldSelf.parallelism",
        "engine kind, version and parallelism are immutable; create a new ModelReplicaSet to change them",
    ),
    # Pods keep the port they started with (an env var), and new pods would reach existing seeds on the new one.
    cel("self.port == oldSelf.port", "engine.port is immutable: running pods keep the port they started with"),
]
TRANSFER_RULES = [
    cel(
        "self.agentPort == oldSelf.agentPort",
        "transfer.agentPort is immutable: running seeds keep the port they started with",
    )
]


class ModelReplicaSetSpec(ApiModel):
    # Required at admission, with no admission default: a null (``kubectl apply`` of ``replicas:``, a merge patch
    # with null) is pruned, and a default would then scale a set of 8 silently to 1. The model keeps its default
    # for code that builds specs.
    ADMISSION_REQUIRED: ClassVar[tuple[str, ...]] = ("replicas",)

    replicas: int = Field(default=1, ge=0, le=10000, description="Desired number of replicas.")
    standby: int = Field(
        default=0,
        ge=0,
        le=MAX_STANDBY,
        description=(
            "Extra pods kept warm: engine started, no weights, not Ready and not counted in status.replicas. "
            "A scale-up promotes one (it takes the weights from a seed into its running engine) and a new "
            "standby refills. Each holds its accelerators while it waits. Engines: "
            + ", ".join(engines.standby_kinds())
            + "."
        ),
    )
    model: ModelIdentity
    engine: EngineSpec
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    template: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod template (metadata, spec) for the engine pods; the operator adds the agent contract.",
    )

    def fingerprint(self) -> str:
        return identity_fingerprint(self.model, self.engine)


def identity_fingerprint(model: ModelIdentity, engine: EngineSpec) -> str:
    """Two pods may exchange weights only if this is equal.

    A short stable hash of everything that changes the bytes in GPU memory:
    model, revision, dtype, quantization, engine kind and version, tp, pp.
    """
    identity = {
        "model": model.name,
        "revision": model.revision,
        "dtype": model.dtype,
        "quantization": model.quantization,
        "engine": engine.kind,
        "engineVersion": engine.version,
        "tp": engine.parallelism.tp,
        "pp": engine.parallelism.pp,
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class TransferCounts(ApiModel):
    in_flight: int = 0
    queued: int = 0  # pods waiting for a seed or storage slot (assignment source: queued)
    completed: int = 0
    failed: int = 0
    fell_back: int = 0


class Condition(ApiModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = None
    last_transition_time: str
    reason: str
    message: str = ""


class ModelReplicaSetStatus(ApiModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    replicas: int = 0
    ready_replicas: int = 0
    standby: int = Field(default=0, description="Standby pods, warm or still starting; never counted in replicas.")
    standby_warm: int = Field(
        default=0, description="Standby pods whose engine is up and warm, waiting for a promotion."
    )
    seeds: int = 0
    backend: str = ""  # the resolved backend (spec, else the cluster's default): transfer_engine or nccl
    transfers: TransferCounts = Field(default_factory=TransferCounts)
    selector: str = ""
    fingerprint: str = ""
    weights_digest: str = ""  # manifest digest of the first verified load; every pod must verify this one
    token_secret: str = ""
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)


class ModelReplicaSet(ApiModel):
    """A whole custom resource, as the operator reads it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelReplicaSetSpec
    status: ModelReplicaSetStatus = Field(default_factory=ModelReplicaSetStatus)
