"""Which pods' weights a set can trust. Pure.

Two rules, both decided before the planner runs, which then treats the answer as input
(pods to replace, pods not to choose as seeds):

- One set, one digest. The manifest digest of the set's first verified load is recorded in
  ``status.weightsDigest``; a pod that verified other bytes (the storage behind ``model.uri``
  changed, or a pod of another build) is never gated Ready and never a seed: it is replaced, and
  the set is Degraded with both digests named. SGLang pods report the digest of SGLang's
  ``/weights_checker`` sums; a report without a digest (an agent older than the field) is not compared.
- Seeds that fail are taken out. A pod that was gated Ready and then reports ``failed`` (its agent
  re-checked its store after a client saw a checksum mismatch, and the store no longer matches its
  manifest) is replaced. A seed named in a client's checksum-mismatch failure is *suspect*: not chosen
  until it reports a re-check (``selfChecks`` grows) or a transfer timeout passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from seedfork_api.contract import ERR_CHECKSUM_MISMATCH, ERR_SELF_CHECK_FAILED

from .podview import PodView
from .problem import Problem


def weights_digest(recorded: str, pods: Iterable[PodView]) -> str:
    """The set's digest: the recorded one, else that of the oldest pod with verified weights."""
    if recorded:
        return recorded
    verified = [p for p in pods if not p.deleting and p.verified and p.report is not None and p.report.digest]
    first = min(verified, key=lambda p: (p.created, p.name), default=None)
    return first.report.digest if first else ""


@dataclass
class Suspect:
    since: float
    checks: int  # the seed's selfChecks when it was suspected


@dataclass
class Verdict:
    replace: dict[str, str] = field(default_factory=dict)  # pod -> why it is replaced
    avoid: set[str] = field(default_factory=set)  # pods not to choose as seeds this pass
    problem: Problem | None = None  # for the Degraded condition


def judge(
    digest: str,
    pods: list[PodView],
    suspects: dict[str, Suspect],
    now: float,
    suspect_for: float,
) -> Verdict:
    """Pods to replace and seeds to avoid. ``suspects`` is the caller's memory across passes, updated here."""
    out = Verdict()
    by_name = {p.name: p for p in pods}
    for pod in pods:
        if pod.deleting:
            continue
        report = pod.report
        if digest and pod.verified and report is not None and report.digest and report.digest != digest:
            why = f"pod {pod.name} verified weights with digest {report.digest}, but this set serves {digest}"
            out.replace[pod.name] = why
            out.problem = out.problem or Problem("WeightsDigestMismatch", f"{why} (status.weightsDigest); replacing it")
        elif pod.gate and report is not None and (report.error or "").startswith(ERR_SELF_CHECK_FAILED):
            out.replace[pod.name] = f"seed {pod.name} stopped serving: {report.error}"
        a, current = pod.assignment, pod.current_report
        caught = current is not None and current.state == "failed" and ERR_CHECKSUM_MISMATCH in (current.error or "")
        if caught and a.source == "seed" and a.seed_pod and a.seed_pod not in suspects:
            seed = by_name.get(a.seed_pod)
            checks = seed.report.self_checks if seed is not None and seed.report is not None else 0
            suspects[a.seed_pod] = Suspect(now, checks)
    for name, s in list(suspects.items()):
        seed = by_name.get(name)
        rechecked = seed is not None and seed.report is not None and seed.report.self_checks > s.checks
        if seed is None or rechecked or now - s.since > suspect_for:
            del suspects[name]
        else:
            out.avoid.add(name)
    return out
