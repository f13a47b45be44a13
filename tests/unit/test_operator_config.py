"""Operator settings: the cluster's transfer defaults are checked when the operator starts."""

from __future__ import annotations

import pytest

from seedfork_operator.__main__ import config_from, main, parse_args
from seedfork_operator.config import ConfigError, OperatorConfig, parse_transfer_defaults


def test_transfer_defaults_from_env_and_flag():
    env = OperatorConfig.from_env({"SEEDFORK_TRANSFER_DEFAULTS": '{"backend": "nccl", "topologyKeys": ["zone"]}'})
    assert env.transfer_defaults.backend == "nccl"
    assert env.transfer_defaults.model_fields_set == {"backend", "topology_keys"}
    assert OperatorConfig.from_env({}).transfer_defaults is None
    args = parse_args(["-A", "--standalone", "--transfer-defaults", '{"retries": 7}'])
    assert config_from(args).transfer_defaults.retries == 7


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("{backend: nccl}", "not JSON"),
        ('["nccl"]', "JSON object"),
        ('{"backend": "pigeon"}', "backend"),
        ('{"retries": -1}', "retries"),
        ('{"agentPort": 19000}', "not agentPort"),  # per-set ports are not a cluster policy
    ],
)
def test_bad_transfer_defaults_are_refused_with_the_reason(raw, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_transfer_defaults(raw)


def test_operator_refuses_to_start_with_bad_transfer_defaults(capsys):
    assert main(["-A", "--standalone", "--transfer-defaults", '{"fallback": "pray"}']) == 2
    assert "transfer defaults: fallback" in capsys.readouterr().err
