"""The seedfork agent: runs in every pod, pulls verified weights from a seed, serves them to later pods."""
