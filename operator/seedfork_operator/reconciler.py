"""One pass over one ModelReplicaSet: read, plan (pure), apply the plan, write status.

The parts: ``expectations`` (our writes the watch has not delivered yet), ``kubeapi`` (every API call),
``applier`` (the plan's writes), ``reporting`` (Events and metrics). The memory kept here besides
theirs: the token last read from the set's Secret, the status last written, suspect seeds and the
storage backoff — all safe to lose on restart. Pod names are deterministic (``<set>-<slot>``, slots
below ``replicas``), so a second operator writing at the same time (an upgrade's overlap) gets 409
instead of a duplicate.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from seedfork_api import contract as c
from seedfork_api.spec import ModelReplicaSet, ModelReplicaSetSpec, resolve_transfer, transfer_problem

from . import planner, render, tokensecret, trust
from .applier import Counts, PlanApplier
from .backoff import Backoff
from .config import OperatorConfig
from .expectations import Expectations
from .kubeapi import Kube, api_message
from .podview import PodView
from .problem import Problem
from .reporting import Reporter
from .status import compute_status

log = logging.getLogger("seedfork.operator")


@dataclass
class PassResult:
    """What one pass found and did, for the status it writes."""

    pods: list[PodView]
    weights_digest: str
    problem: Problem | None
    fingerprint: str = ""
    token_secret: str = ""
    counts: Counts = field(default_factory=Counts)


@dataclass
class SetReconciler:
    kube: Kube
    config: OperatorConfig
    namespace: str
    name: str
    uid: str
    expect: Expectations = field(default_factory=Expectations)
    report: Reporter | None = None
    token_secret: str = ""  # the Secret last read, and the token in it (to recreate it, and to see a rotation)
    token_value: str | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    suspects: dict[str, trust.Suspect] = field(default_factory=dict)  # seeds a client saw a checksum mismatch from
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        if self.backoff is None:
            self.backoff = Backoff(self.config.storage_backoff, self.config.storage_backoff_cap)
        if self.report is None:
            self.report = Reporter(self.namespace, self.name, self.uid)

    # ------------------------------------------------------------ one pass
    async def reconcile(self, body: Mapping[str, Any], indexed: list[PodView]) -> None:
        now = time.time()
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        old_status = dict(body.get("status") or {})
        spec, problem = self._read(body)
        out = PassResult(
            pods=self.expect.overlay(indexed, now),
            weights_digest=str(old_status.get("weightsDigest") or ""),
            problem=problem,
            fingerprint=spec.fingerprint() if spec else "",
        )
        if spec:
            await self._act(spec, out, indexed, old_status, generation, now)
        self.report.problem(out.problem)
        await self._write_status(spec, out, old_status, generation, now)

    def _read(self, body: Mapping[str, Any]) -> tuple[ModelReplicaSetSpec | None, Problem | None]:
        """The spec with its transfer policy resolved against the cluster's defaults, or why there is none."""
        try:
            mrs = ModelReplicaSet.model_validate(dict(body))
        except ValidationError as err:
            return None, Problem("InvalidSpec", f"spec does not parse: {err.errors()[0].get('msg')}")
        transfer = resolve_transfer(mrs.spec.transfer, self.config.transfer_defaults, mrs.spec.engine.kind)
        spec = mrs.spec.model_copy(update={"transfer": transfer})
        problem = transfer_problem(spec)
        return spec, Problem("InvalidTransferPolicy", problem) if problem else None

    async def _act(
        self,
        spec: ModelReplicaSetSpec,
        out: PassResult,
        indexed: list[PodView],
        old_status: Mapping[str, Any],
        generation: int,
        now: float,
    ) -> None:
        out.token_secret, problem = await self._ensure_token(spec.transfer.token_secret_name, out.pods)
        out.problem = out.problem or problem or _template_problem(spec)
        plan, verdict, out.weights_digest = await self._plan(spec, out, old_status, now)
        if out.problem:
            plan.create = []  # nothing new until the input is fixed; existing pods keep being served
        self._storage_backoff(generation, plan, out.pods, verdict, now)
        out.problem = out.problem or verdict.problem or self.backoff.problem()
        # Pods being replaced for untrusted weights leave the Ready set now, not when their deletion completes.
        ungate = [p.name for p in out.pods if p.name in verdict.replace and p.gate]
        renderer = self._pod_renderer(spec, out.fingerprint, out.token_secret)
        applier = PlanApplier(self.kube, self.namespace, self.expect, self.report, renderer, out.pods, out.counts)
        out.problem = await applier.apply(plan, ungate) or out.problem
        out.pods = self.expect.overlay(indexed, now)
        self.report.ready(out.pods)

    async def _plan(
        self, spec: ModelReplicaSetSpec, out: PassResult, old_status: Mapping[str, Any], now: float
    ) -> tuple[planner.Plan, trust.Verdict, str]:
        """The plan, the trust verdict it was made with, and the set's weights digest."""
        pods = out.pods
        nodes = {n: await self.kube.node_labels(n) for n in {p.node for p in pods if p.node}}
        template_node = (spec.template.get("spec") or {}).get("nodeName")
        if template_node:
            nodes[template_node] = await self.kube.node_labels(template_node)
        recorded = old_status.get("weightsDigest") or self.last_status.get("weightsDigest") or ""
        digest = trust.weights_digest(recorded, pods)
        verdict = trust.judge(digest, pods, self.suspects, now, spec.transfer.timeout_seconds)
        names = self._namer(pods, spec.replicas + spec.standby)
        plan = planner.plan(
            spec, out.fingerprint, pods, nodes, now, names, template_node, replace=verdict.replace, avoid=verdict.avoid
        )
        return plan, verdict, digest

    async def _write_status(
        self,
        spec: ModelReplicaSetSpec | None,
        out: PassResult,
        old_status: Mapping[str, Any],
        generation: int,
        now: float,
    ) -> None:
        status = compute_status(
            spec=spec,
            fingerprint=out.fingerprint,
            pods=out.pods,
            old={**old_status, "transfers": self._counter_base(old_status)},
            generation=generation,
            selector=render.selector(self.name),
            token_secret=out.token_secret,
            weights_digest=out.weights_digest,
            counts=out.counts.as_status(),
            degraded=out.problem,
            now=now,
        )
        self.report.in_flight(status["transfers"]["inFlight"])
        if status != self.last_status or _differs(old_status, status):
            await self.kube.patch_set_status(self.namespace, self.name, status)
            self.last_status = status

    # ------------------------------------------------------------ helpers
    def _namer(self, pods: list[PodView], replicas: int) -> Callable[[], str | None]:
        """Names for new pods: the lowest free slots ``<set>-<k>``, k < replicas (+ standbys: a promoted standby
        keeps its name).

        Two operators (or one that lost its expectations) planning from the same or an older view pick
        names from the same few slots, so a second create gets 409 and never a pod beyond ``replicas``.
        A slot frees when its pod object is gone, so a replacement waits for its predecessor's deletion.
        """
        taken = {p.name for p in pods}
        free = (f"{self.name}-{k}" for k in range(replicas) if f"{self.name}-{k}" not in taken)
        return lambda: next(free, None)

    def _pod_renderer(
        self, spec: ModelReplicaSetSpec, fingerprint: str, token_secret: str
    ) -> Callable[..., dict[str, Any]]:
        """The set's pod for a slot name and an assignment, as the applier creates it."""
        render_one = partial(
            render.render_pod,
            spec=spec,
            set_name=self.name,
            set_uid=self.uid,
            namespace=self.namespace,
            fingerprint=fingerprint,
            token_secret=token_secret,
            agent_image=self.config.agent_image,
            token_digest=tokensecret.token_digest(self.token_value) if self.token_value else "",
        )
        return lambda name, assignment: render_one(pod_name=name, assignment=assignment)

    def _storage_backoff(
        self, generation: int, plan: planner.Plan, pods: list[PodView], verdict: trust.Verdict, now: float
    ) -> None:
        """Count failed storage loads, reset on a verified one, and hold back new storage pods meanwhile."""
        b = self.backoff
        b.observe_generation(generation)
        by_name = {p.name: p for p in pods}
        storage = {p.name for p in pods if p.assignment is not None and p.assignment.source == "storage"}
        if any(name in storage for name in plan.gate):
            b.succeeded()
        for failure in plan.failures:
            if failure.seed is None:
                b.failed(failure.reason, now)
        for name, why in verdict.replace.items():
            if name in storage and by_name[name].verified:
                b.failed(why, now)
        if b.holding(now):
            held = {n for n, a in plan.create if a.source == "storage"}
            plan.create = [(n, a) for n, a in plan.create if n not in held]
            plan.choices = [ch for ch in plan.choices if ch.pod not in held]

    def _counter_base(self, old: Mapping[str, Any]) -> dict[str, int]:
        # The watched body may lag our last status write: never count from an older base.
        a, b = old.get("transfers") or {}, self.last_status.get("transfers") or {}
        return {k: max(int(a.get(k, 0)), int(b.get(k, 0))) for k in ("completed", "failed", "fellBack")}

    # ------------------------------------------------------------ the token Secret
    async def _ensure_token(self, named: str | None, pods: list[PodView]) -> tuple[str, Problem | None]:
        """Read the Secret on every pass (its watch wakes the set at once) and act on it (``tokensecret``)."""
        secret = named or render.token_secret_name(self.name)
        try:
            found = await self.kube.read_secret(self.namespace, secret)
        except ApiException as err:
            return secret, Problem("TokenSecretUnreadable", f"cannot read Secret {secret}: {err.status} {err.reason}")
        step = tokensecret.decide(
            secret=secret,
            namespace=self.namespace,
            named=bool(named),
            found=None if found is None else tokensecret.decoded(found.data),
            last_token=self.token_value if self.token_secret == secret else None,
            pod_digests=[p.token_digest for p in pods if not p.deleting],
            new_token=secrets.token_urlsafe(32),
        )
        try:
            await self._write_token(secret, step, found)
        except ApiException as err:
            if err.status == 409:  # someone wrote it meanwhile: the next pass (woken by its watch) reads it again
                return secret, None
            return secret, Problem("TokenSecretUnwritable", f"cannot write Secret {secret}: {api_message(err)}")
        if step.event is not None:
            self.report.token_secret(*step.event, warning=step.create is not None)
        if step.token:
            self.token_secret, self.token_value = secret, step.token
        return secret, step.problem

    async def _write_token(self, secret: str, step: tokensecret.Step, found: client.V1Secret | None) -> None:
        if step.create is not None:
            token = step.create[c.TOKEN_SECRET_KEY]
            created = render.render_token_secret(
                set_name=self.name, set_uid=self.uid, namespace=self.namespace, token=token
            )
            await self.kube.create_secret(self.namespace, created)
        elif step.patch is not None:
            data = {k: v if v is None else base64.b64encode(v.encode()).decode() for k, v in step.patch.items()}
            patch = {"metadata": {"resourceVersion": found.metadata.resource_version}, "data": data}
            await self.kube.patch_secret(self.namespace, secret, patch)


def _template_problem(spec: ModelReplicaSetSpec) -> Problem | None:
    try:
        render.check_template(spec.template, spec.engine.kind)
    except render.TemplateError as err:
        return Problem("InvalidTemplate", str(err))
    return None


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())
