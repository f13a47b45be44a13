"""The seedfork operator (kopf): owns the pods of each ModelReplicaSet, picks seeds, gates readiness."""
