"""What seedfork reads from an SGLang command line, shared by the operator (template checks) and the agent.

SGLang 0.5.23 parses its flags with argparse and its default ``allow_abbrev``: a unique prefix of a flag
is that flag (``--dp 2`` is ``--dp-size 2``), so flags are matched by prefix here too. The option names are
checked against SGLang's own parser by the `sglang` test tier (docs/sglang.md).
"""

from __future__ import annotations

from collections.abc import Sequence

# SGLang's R-Fork seed asserts one data-parallel rank, num_dp_ranks = dp_size * attn_dp_size == 1
# (tokenizer_control_mixin.py); a client of such a seed never gets its weights.
DATA_PARALLEL_OPTIONS = {
    "--dp-size": "dp_size",
    "--data-parallel-size": "dp_size",
    "--attn-dp-size": "attn_dp_size",
    "--attention-data-parallel-size": "attn_dp_size",
}


def _matches(word: str, options: Sequence[str]) -> bool:
    return len(word) > 3 and any(option.startswith(word) for option in options)


def data_parallel_problem(argv: Sequence[str]) -> str | None:
    """Why this command cannot seed or be seeded by R-Fork (a data-parallel size above 1), or None."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if not _matches(name, list(DATA_PARALLEL_OPTIONS)):
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            size = int(value)
        except ValueError:
            return f"{name} {value!r} is not an integer"
        if size > 1:
            return (
                f"{name} {size}: data parallel size above 1, and SGLang's R-Fork seed asserts dp_size * attn_dp_size "
                "== 1, so no pod of this set could seed another; use tensor parallelism, or one set per replica group"
            )
    return None
