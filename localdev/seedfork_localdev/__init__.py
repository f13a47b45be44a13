"""Local development and test tooling: a real control plane on loopback (and, later, a pod runner).

Nothing here is part of the product that runs in a cluster.
"""
