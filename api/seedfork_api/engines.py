"""What each inference engine can do: one row per engine, and the functions that read the rows.

Every rule that depends on the engine kind reads this table: the CRD's CEL rules and the checks of the resolved
policy (``spec.SPEC_RULES``, ``spec.transfer_problem``), the operator's planner (client limits, cohorts, which pods
can seed), pod rendering (how the agent joins the pod, template checks), and the agent (standby, the engine gate,
the engine's phases, SGLang's launch). An engine, or an engine release that lifts a limit, is one row. SGLang's
facts are those of the release docs/sglang.md was verified against.

No imports from the rest of the API: the spec's models are built from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConcreteBackend = Literal["transfer_engine", "nccl"]

# How the agent joins the engine's pod, and so who moves the bytes:
# - entry_point: the agent launches the engine (``seedfork-agent run -- <command>``), which moves its own bytes
#   (SGLang's R-Fork loader); the agent runs no TransferEngine and no NCCL cohort of its own;
# - store_loader: an agent sidecar moves the bytes into its store, and the engine loads them from that store in
#   its own processes and proves it to the agent (vLLM with seedfork's model loader);
# - sidecar: an agent sidecar moves the bytes into its store, and the engine maps that store (zero-copy), re-checks
#   it and proves it to the agent (the reference engine).
AgentRole = Literal["entry_point", "store_loader", "sidecar"]


@dataclass(frozen=True)
class Limit:
    """An upper bound an engine puts on a value of the spec, and why (the reason admission shows)."""

    most: int
    why: str

    @property
    def bound(self) -> str:
        """The bound in words: ``must be {bound}``."""
        return "1" if self.most == 1 else f"at most {self.most}"


@dataclass(frozen=True)
class OwnPorts:
    """Ports each pod of the engine binds for itself at the top of ``spec.transfer.ports``."""

    count: int
    what: str


@dataclass(frozen=True)
class Engine:
    kind: str
    agent: AgentRole
    auto_backend: ConcreteBackend = "transfer_engine"  # what ``backend: auto`` means for this engine
    te_max_pp: Limit | None = None  # pipeline stages a TransferEngine transfer can serve
    nccl_max_clients: Limit | None = None  # NCCL clients one seed serves at once
    max_ranks: Limit | None = None  # tp * pp
    needs_uri: bool = False  # the first replica loads from model.uri (the engine has no model path of its own)
    te_clients_seed: bool = True  # a pod that loaded from a seed through TransferEngine can seed others
    standby: bool = False  # its pods can wait warm (engine up, no weights) and take weights when promoted
    standby_design: str | None = None  # without standby: the doc section that designs it and says why not built
    publishes_phases: bool = False  # the engine reports its own phases (GET /v1/engine)
    own_ports: OwnPorts | None = None

    @property
    def proves_load(self) -> bool:
        """The engine proves to the agent what it loaded before the pod counts as verified (``engines.gate``):
        the readiness gate then stands for the weights inside the engine, not only the agent's copy."""
        return self.agent in ("store_loader", "sidecar")

    @property
    def agent_moves_bytes(self) -> bool:
        """The agent's own TransferEngine and NCCL groups move the bytes (cohorts, its TransferEngine ports)."""
        return self.agent != "entry_point"

    def client_limit(self, backend: ConcreteBackend, asked: int) -> int:
        """Clients one seed serves at once over ``backend`` when the spec asks for ``asked``."""
        if backend == "nccl" and self.nccl_max_clients is not None:
            return min(asked, self.nccl_max_clients.most)
        return asked

    def seeds_after(self, backend: ConcreteBackend) -> bool:
        """Whether a pod that loaded from a seed over ``backend`` can seed in turn."""
        return backend != "transfer_engine" or self.te_clients_seed


ENGINES: dict[str, Engine] = {
    e.kind: e
    for e in (
        Engine(
            "sglang",
            agent="entry_point",
            te_max_pp=Limit(1, "SGLang keys TransferEngine info by TP rank only"),
            nccl_max_clients=Limit(1, "an SGLang seed serves one NCCL client at a time"),
            te_clients_seed=False,  # SGLang does not republish weights it received through TransferEngine
            standby_design="docs/sglang.md#standby-what-sglang-offers-and-the-design-it-permits",
            own_ports=OwnPorts(2, "its dist-init store and engine-info bootstrap server"),  # contract.sglang_own_ports
        ),
        Engine("vllm", agent="store_loader", standby=True),
        Engine(
            "reference",
            agent="sidecar",
            max_ranks=Limit(1, "its agent serves one rank"),
            needs_uri=True,
            standby=True,
            publishes_phases=True,
        ),
    )
}


def of(kind: str) -> Engine:
    """The row of an engine kind (``KeyError`` for a kind the spec does not admit)."""
    return ENGINES[kind]


def resolve_backend(backend: str, kind: str) -> ConcreteBackend:
    """The backend a set of this engine moves bytes with; the one place ``auto`` is resolved."""
    return of(kind).auto_backend if backend == "auto" else backend  # type: ignore[return-value]


def standby_kinds() -> list[str]:
    """The engines whose pods can be standbys, by name."""
    return sorted(e.kind for e in ENGINES.values() if e.standby)
