"""One pass over one ModelReplicaSet: read, plan (pure), act, write status.

The only module that talks to the API besides kopf itself. It keeps two kinds of
memory, both safe to lose on restart: *expectations* (pods it created or deleted
whose watch events have not arrived yet, so a fast second pass does not create
duplicates), caches (node labels), the token last read from the set's Secret and the storage backoff.
Pod names are deterministic (``<set>-<slot>``, slots below ``replicas``), so a second
operator writing at the same time (an upgrade's overlap) gets 409 instead of a duplicate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from seedfork_api import contract as c
from seedfork_api.spec import (
    GROUP,
    PLURAL,
    VERSION,
    ModelReplicaSet,
    ModelReplicaSetSpec,
    resolve_transfer,
    transfer_problem,
)

from . import metrics, planner, render, tokensecret, trust
from .backoff import Backoff
from .config import OperatorConfig
from .podview import PodView
from .status import compute_status, now_rfc3339

log = logging.getLogger("seedfork.operator")

EXPECTATION_TTL = 30.0  # seconds to trust our own create/delete before the watch confirms it
NODE_TTL = 30.0


class Kube:
    """Blocking kubernetes-client calls, run in worker threads, each bounded by ``timeout`` seconds."""

    def __init__(self, api: client.ApiClient, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout
        self.core = client.CoreV1Api(api)
        self.objects = client.CustomObjectsApi(api)
        self._nodes: dict[str, tuple[float, dict[str, str]]] = {}

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        from kubernetes import config

        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None)
        api.configuration.connection_pool_maxsize = 32
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 32
        return cls(api, timeout)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def node_labels(self, name: str) -> dict[str, str]:
        hit = self._nodes.get(name)
        if hit and time.monotonic() - hit[0] < NODE_TTL:
            return hit[1]
        try:
            node = await self.call(self.core.read_node, name)
            labels = dict(node.metadata.labels or {})
        except ApiException as err:
            # 404: not (yet) a Node; 403: RBAC without nodes — then no topology preference, never a crash.
            log.debug("node %s labels unavailable: %s", name, err.status)
            labels = {}
        self._nodes[name] = (time.monotonic(), labels)
        return labels


@dataclass
class SetReconciler:
    kube: Kube
    config: OperatorConfig
    namespace: str
    name: str
    uid: str
    created: dict[str, tuple[float, PodView]] = field(default_factory=dict)  # expectations
    deleted: dict[str, float] = field(default_factory=dict)
    token_secret: str = ""  # the Secret last read, and the token in it (to recreate it, and to see a rotation)
    token_value: str | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    last_warning: str | None = None
    assigned: dict[str, tuple[float, c.Assignment]] = field(default_factory=dict)  # written, not yet watched
    gating: dict[str, float] = field(default_factory=dict)  # gate set, not yet watched
    gated: set[str] = field(default_factory=set)  # pod uids this process gated, for the Ready histogram
    suspects: dict[str, trust.Suspect] = field(default_factory=dict)  # seeds a client saw a checksum mismatch from
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        if self.backoff is None:
            self.backoff = Backoff(self.config.storage_backoff, self.config.storage_backoff_cap)

    def _resolved(self, spec: ModelReplicaSetSpec) -> ModelReplicaSetSpec:
        """The spec with its transfer policy resolved against the cluster's defaults."""
        transfer = resolve_transfer(spec.transfer, self.config.transfer_defaults, spec.engine.kind)
        return spec.model_copy(update={"transfer": transfer})

    # ------------------------------------------------------------ one pass
    async def reconcile(self, body: Mapping[str, Any], indexed: list[PodView]) -> None:
        now = time.time()
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        old_status = dict(body.get("status") or {})
        pods = self._with_expectations(indexed, now)
        degraded: tuple[str, str] | None = None
        counts = {"completed": 0, "failed": 0, "fellBack": 0}

        try:
            mrs = ModelReplicaSet.model_validate(dict(body))
        except ValidationError as err:
            mrs = None
            degraded = ("InvalidSpec", f"spec does not parse: {err.errors()[0].get('msg')}")
        spec = self._resolved(mrs.spec) if mrs else None
        problem = transfer_problem(spec) if spec else None
        if problem:
            degraded = degraded or ("InvalidTransferPolicy", problem)
        fingerprint = spec.fingerprint() if spec else ""
        token_secret = ""
        weights_digest = str(old_status.get("weightsDigest") or "")
        if spec:
            token_secret, problem = await self._ensure_token(body, spec.transfer.token_secret_name, pods)
            degraded = degraded or problem
            try:
                render.check_template(spec.template, spec.engine.kind)
            except render.TemplateError as err:
                degraded = degraded or ("InvalidTemplate", str(err))

        if spec:
            nodes = {n: await self.kube.node_labels(n) for n in {p.node for p in pods if p.node}}
            template_node = (spec.template.get("spec") or {}).get("nodeName")
            if template_node:
                nodes[template_node] = await self.kube.node_labels(template_node)
            recorded = old_status.get("weightsDigest") or self.last_status.get("weightsDigest") or ""
            weights_digest = trust.weights_digest(recorded, pods)
            verdict = trust.judge(weights_digest, pods, self.suspects, now, spec.transfer.timeout_seconds)
            names = self._namer(pods, spec.replicas + spec.standby)
            plan = planner.plan(
                spec, fingerprint, pods, nodes, now, names, template_node, replace=verdict.replace, avoid=verdict.avoid
            )
            if degraded:
                plan.create = []  # nothing new until the input is fixed; existing pods keep being served
            self._storage_backoff(generation, plan, pods, verdict, now)
            degraded = degraded or verdict.problem or self.backoff.problem()
            # Pods being replaced for untrusted weights leave the Ready set now, not when their deletion completes.
            ungate = [p.name for p in pods if p.name in verdict.replace and p.gate]
            problem = await self._execute(body, spec, fingerprint, token_secret, plan, counts, pods, ungate)
            degraded = problem or degraded
            pods = self._with_expectations(indexed, now)
            self._observe_ready(pods)

        if degraded and degraded[1] != self.last_warning:
            kopf.event(dict(body), type="Warning", reason=degraded[0], message=degraded[1])
        self.last_warning = degraded[1] if degraded else None

        base = self._counter_base(old_status)
        status = compute_status(
            spec=spec,
            fingerprint=fingerprint,
            pods=pods,
            old={**old_status, "transfers": base},
            generation=generation,
            selector=render.selector(self.name),
            token_secret=token_secret,
            weights_digest=weights_digest,
            counts=counts,
            degraded=degraded,
            now=now,
        )
        metrics.TRANSFERS_IN_FLIGHT.labels(self.namespace, self.name).set(status["transfers"]["inFlight"])
        if status != self.last_status or _differs(old_status, status):
            await self.kube.call(
                self.kube.objects.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                {"status": status},
            )
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

    def _with_expectations(self, indexed: list[PodView], now: float) -> list[PodView]:
        """The pods as the index shows them, corrected by our own writes the watch has not delivered yet."""
        seen = {p.name: p for p in indexed}
        for name in [n for n, (t, _) in self.created.items() if n in seen or now - t > EXPECTATION_TTL]:
            del self.created[name]
        for name in [n for n, t in self.deleted.items() if n not in seen or now - t > EXPECTATION_TTL]:
            del self.deleted[name]
        for name, (t, a) in list(self.assigned.items()):
            p = seen.get(name)
            if p is None or (p.assignment and p.assignment.attempt >= a.attempt) or now - t > EXPECTATION_TTL:
                del self.assigned[name]
        for name, t in list(self.gating.items()):
            p = seen.get(name)
            if p is None or p.gate or now - t > EXPECTATION_TTL:
                del self.gating[name]
        pods = []
        for p in indexed:
            if p.name in self.deleted:
                p = replace(p, deleting=True)
            if p.name in self.assigned:
                p = replace(p, assignment=self.assigned[p.name][1])
            if p.name in self.gating:
                p = replace(p, gate=True)
            pods.append(p)
        return pods + [view for _, view in self.created.values()]

    def _counter_base(self, old: Mapping[str, Any]) -> dict[str, int]:
        # The watched body may lag our last status write: never count from an older base.
        a, b = old.get("transfers") or {}, self.last_status.get("transfers") or {}
        return {k: max(int(a.get(k, 0)), int(b.get(k, 0))) for k in ("completed", "failed", "fellBack")}

    async def _ensure_token(
        self, body: Mapping[str, Any], named: str | None, pods: list[PodView]
    ) -> tuple[str, tuple[str, str] | None]:
        """Read the Secret on every pass (its watch wakes the set at once) and act on it (``tokensecret``)."""
        secret = named or render.token_secret_name(self.name)
        try:
            found = await self.kube.call(self.kube.core.read_namespaced_secret, secret, self.namespace)
        except ApiException as err:
            if err.status != 404:
                return secret, ("TokenSecretUnreadable", f"cannot read Secret {secret}: {err.status} {err.reason}")
            found = None
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
            if step.create is not None:
                token = step.create[c.TOKEN_SECRET_KEY]
                created = render.render_token_secret(
                    set_name=self.name, set_uid=self.uid, namespace=self.namespace, token=token
                )
                await self.kube.call(self.kube.core.create_namespaced_secret, self.namespace, created)
            elif step.patch is not None:
                data = {k: v if v is None else base64.b64encode(v.encode()).decode() for k, v in step.patch.items()}
                patch = {"metadata": {"resourceVersion": found.metadata.resource_version}, "data": data}
                await self.kube.call(self.kube.core.patch_namespaced_secret, secret, self.namespace, patch)
        except ApiException as err:
            if err.status == 409:  # someone wrote it meanwhile: the next pass (woken by its watch) reads it again
                return secret, None
            return secret, ("TokenSecretUnwritable", f"cannot write Secret {secret}: {_api_message(err)}")
        if step.event is not None:
            kopf.event(dict(body), type="Normal" if step.create is None else "Warning", reason=step.event[0],
                       message=step.event[1])  # fmt: skip
        if step.token:
            self.token_secret, self.token_value = secret, step.token
        return secret, step.problem

    async def _execute(
        self,
        body: Mapping[str, Any],
        spec: Any,
        fingerprint: str,
        token_secret: str,
        plan: planner.Plan,
        counts: dict[str, int],
        pods: list[PodView],
        ungate: Iterable[str] = (),
    ) -> tuple[str, str] | None:
        core = self.kube.core
        problem: tuple[str, str] | None = None
        set_ref = dict(body)
        limit = asyncio.Semaphore(16)

        async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            async with limit:
                return await self.kube.call(fn, *args, **kwargs)

        for name, reason in plan.delete:
            self.deleted[name] = time.time()
            kopf.event(set_ref, type="Normal", reason="PodDeleted", message=f"deleting pod {name}: {reason}")
        for failure in plan.failures:
            counts["failed"] += 1
            source = "seed" if failure.seed else "storage"
            metrics.TRANSFER_FAILURES.labels(self.namespace, self.name, source).inc()
            frm = f"from seed {failure.seed}" if failure.seed else "from storage"
            kopf.event(
                set_ref,
                type="Warning",
                reason="TransferFailed",
                message=f"pod {failure.pod} attempt {failure.attempt} {frm} failed: {failure.reason}",
            )
        for ch in plan.choices:
            metrics.SEED_SELECTIONS.labels(self.namespace, self.name, ch.locality, ch.why).inc()
            if ch.why == "fallback":
                metrics.FALLBACKS.labels(self.namespace, self.name).inc()
            src = f"seed {ch.seed} (shared {ch.locality})" if ch.seed else "storage"
            kopf.event(
                set_ref,
                type="Normal",
                reason="SeedFailover" if ch.why in ("retry", "fallback") else "SeedChosen",
                message=f"pod {ch.pod} attempt {ch.attempt} loads from {src} [{ch.why}]",
            )
        counts["fellBack"] += plan.fell_back

        async def delete(name: str) -> None:
            try:
                await run(core.delete_namespaced_pod, name, self.namespace)
            except ApiException as err:
                if err.status != 404:
                    raise

        async def create(name: str, assignment: c.Assignment) -> tuple[str, str] | None:
            pod = render.render_pod(
                spec=spec,
                set_name=self.name,
                set_uid=self.uid,
                namespace=self.namespace,
                pod_name=name,
                fingerprint=fingerprint,
                assignment=assignment,
                token_secret=token_secret,
                agent_image=self.config.agent_image,
                token_digest=tokensecret.token_digest(self.token_value) if self.token_value else "",
            )
            self.created[name] = (time.time(), PodView(name=name, created=time.time(), assignment=assignment))
            try:
                await run(core.create_namespaced_pod, self.namespace, pod)
            except ApiException as err:
                self.created.pop(name, None)  # not created: the next pass plans it again
                if err.status in (400, 422):
                    return ("PodRejected", f"the apiserver rejected the rendered pod: {_api_message(err)}")
                if err.status == 409:  # another writer (a second operator during an upgrade) made this slot's pod
                    log.info("pod %s exists already; next pass sees it", name)
                    return None
                raise
            return None

        promoted = set(plan.promoted)

        async def assign(name: str, assignment: c.Assignment, version: str) -> None:
            patch = c.annotation_patch(assignment=assignment)
            if name in promoted:  # one patch: label and assignment change together, or neither does
                patch["metadata"]["labels"] = {c.LABEL_ROLE: c.ROLE_REPLICA}
                kopf.event(set_ref, type="Normal", reason="StandbyPromoted", message=f"standby {name} promoted")
            if version:
                patch["metadata"]["resourceVersion"] = version  # only if the pod is as we saw it
            try:
                await run(core.patch_namespaced_pod, name, self.namespace, patch)
            except ApiException as err:
                if err.status not in (404, 409):
                    raise
                log.info("assignment of %s skipped (%s); next pass decides again", name, err.status)
                return
            self.assigned[name] = (time.time(), assignment)

        async def set_gate(name: str, status: str, reason: str, message: str) -> bool:
            """Write the readiness-gate condition; False when the pod is gone."""
            condition = {
                "type": c.READINESS_GATE,
                "status": status,
                "lastTransitionTime": now_rfc3339(time.time()),
                "reason": reason,
                "message": message,
            }
            try:
                await run(
                    core.patch_namespaced_pod_status, name, self.namespace, {"status": {"conditions": [condition]}}
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                return False
            return True

        async def gate(name: str) -> None:
            if not await set_gate(name, "True", "WeightsVerified", "the agent verified the weights"):
                return
            self.gating[name] = time.time()
            counts["completed"] += 1
            metrics.VERIFIED.labels(self.namespace, self.name).inc()
            if name in uids:
                self.gated.add(uids[name])

        async def untrust(name: str) -> None:
            await set_gate(name, "False", "WeightsUntrusted", "the pod's weights failed a check; it is being replaced")

        uids = {p.name: p.uid for p in pods}
        versions = {p.name: p.resource_version for p in pods}
        jobs: list[Any] = [delete(n) for n, _ in plan.delete]
        jobs += [create(n, a) for n, a in plan.create]
        jobs += [assign(n, a, versions.get(n, "")) for n, a in plan.assign]
        jobs += [gate(n) for n in plan.gate]
        jobs += [untrust(n) for n in ungate]
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, ApiException):
                log.warning("API call failed: %s %s", result.status, _api_message(result))
            elif isinstance(result, BaseException):
                log.error("action failed: %r", result)
            elif isinstance(result, tuple):
                problem = problem or result
        return problem

    def _observe_ready(self, pods: list[PodView]) -> None:
        for pod in pods:
            if pod.uid in self.gated and pod.ready and pod.created:
                metrics.POD_READY_SECONDS.labels(self.namespace, self.name).observe(max(time.time() - pod.created, 0))
                self.gated.discard(pod.uid)


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body).get("message", err.reason)
    except (TypeError, ValueError):
        return str(err.reason)


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())
