"""Exactly the Kubernetes permissions the operator uses (the Helm chart's Role/ClusterRole is built from this).

Namespaced resources are needed in every watched namespace (a Role per namespace,
or a ClusterRole bound cluster-wide for ``--all-namespaces``). Nodes are optional:
without ``get`` on nodes the operator still works but cannot prefer nearby seeds.
kopf itself needs: list/watch of the CRD kinds it serves, events, and (for
peering/HA) the kopf peering resources.
"""

from __future__ import annotations

RULES: list[dict[str, list[str]]] = [
    # the sets: watch them, write status; kopf writes its finalizer/progress annotations on the object
    {
        "apiGroups": ["seedfork.io"],
        "resources": ["modelreplicasets"],
        "verbs": ["get", "list", "watch", "patch", "update"],
    },
    {"apiGroups": ["seedfork.io"], "resources": ["modelreplicasets/status"], "verbs": ["get", "patch", "update"]},
    # owned pods: create with the contract, write the assignment annotation, delete on scale-down/replace
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    # the readiness gate condition seedfork.io/weights-ready
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch"]},
    # the per-set token Secret: created unless spec.transfer.tokenSecretName names one; read on every pass and
    # watched (label seedfork.io/set), so a deletion or rotation is noticed at once; patched to keep the previous
    # token during a rotation's grace period (get on Secrets already reads any of them by name)
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # Events for seed choices, failovers and bad input (kopf posts through both APIs)
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # cluster-scoped, optional: node labels for topology preference (same node, then same zone)
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    # cluster-scoped: kopf discovers the API and the CRD
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    # cluster-scoped, in every mode: kopf lists and watches namespaces to follow them, even with --namespace
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # HA only (--peering NAME): kopf's peering objects (create the CRDs from kopf's peering.yaml)
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["kopfpeerings", "clusterkopfpeerings"],
        "verbs": ["get", "list", "watch", "patch"],
    },
]
