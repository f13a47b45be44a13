"""Shared API of seedfork: the ModelReplicaSet spec, the generated CRD, and the pod contract."""
