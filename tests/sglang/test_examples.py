"""The SGLang examples name the SGLang version the `sglang` tier tests (tests/sglang/requirements.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("sglang-*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_the_tested_sglang(tier, path):
    version = tier.version()
    text = path.read_text()
    spec = yaml.safe_load(text)["spec"]
    assert spec["engine"]["version"] == version
    for container in spec["template"]["spec"]["containers"]:
        tag = container["image"].rsplit(":", 1)[-1]
        assert re.fullmatch(rf"v?{re.escape(version)}(-[\w.]+)?", tag), f"{container['image']} is not SGLang {version}"
    # The image recipe in the comments too (FROM lmsysorg/sglang:<tag>).
    for tag in re.findall(r"lmsysorg/sglang:(\S+)", text):
        assert re.fullmatch(rf"v?{re.escape(version)}(-[\w.]+)?", tag), tag


def test_there_are_sglang_examples():
    assert len(EXAMPLES) >= 2
