"""The seedfork operator (kopf): owns the pods of each ModelReplicaSet, picks seeds, gates readiness.

How one pass is put together: ``handlers`` (kopf wiring, thin) runs a ``reconciler.SetReconciler`` per set,
which reads the set, asks the pure ``planner`` (with ``trust``, ``backoff``, ``tokensecret``) what to do,
has ``applier`` carry the plan out through ``kubeapi`` (every API call the operator makes), remembers its
own writes in ``expectations`` until the watch shows them, tells people through ``reporting`` (Events,
``metrics``) and writes the status ``status`` computes. A reason for Degraded is a ``problem.Problem``.
"""
