"""The `sglang` test tier (fixture ``tier``): where SGLang's own code is and how to run it.

SGLang runs in a subprocess of this interpreter (``helper.py``) with SGLang's folder first on its path, so
the project's environment never sees SGLang's packages. Without that folder the tests fail under CI
(``CI=true``: setup must have installed it) and are skipped elsewhere with the command that installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
HELPER = HERE / "helper.py"
# A small Llama: SGLang's resolution reads the model's config.json, and nothing here loads weights.
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}


def version() -> str:
    """The SGLang version the tier tests (its one home: requirements.txt)."""
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("sglang=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{REQUIREMENTS} names no sglang==<version>")


def site() -> Path:
    cache = Path(os.environ.get("SEEDFORK_CACHE") or Path.home() / ".cache" / "seedfork")
    return cache / f"sglang-{version()}" / "site"


def require() -> Path:
    """SGLang's folder; fails in CI and skips elsewhere when setup did not install it."""
    path = site()
    if (path.parent / ".installed").is_file() and (path / "sglang").is_dir():
        return path
    message = f"SGLang {version()} is not installed at {path}: run scripts/setup_sglang.sh (make setup does)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(op: str, request: dict | None = None, *, env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run ``helper.py OP`` on SGLang's code with ``request`` on stdin; its JSON answer."""
    path = require()
    extra = [str(path)]
    if env and env.get("PYTHONPATH"):
        extra.insert(0, env["PYTHONPATH"])  # a test's own shadows go first
    child_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(extra),
        "PYTHONWARNINGS": "ignore",
        "HF_HUB_OFFLINE": "1",
        "SGLANG_DISABLE_REQUEST_LOGGING": "1",
    }
    out = subprocess.run(
        [sys.executable, str(HELPER), op],
        input=json.dumps(request or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=str(ROOT),
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise AssertionError(f"helper {op} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def tier():
    """This module's functions, for the tests: ``tier.run(op, request)``, ``tier.version()``."""
    import types

    return types.SimpleNamespace(run=run, version=version, site=site, require=require)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A model path SGLang resolves: a folder with ``LLAMA`` as its config.json."""
    d = tmp_path_factory.mktemp("llama-config")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d
