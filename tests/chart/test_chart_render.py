"""The Helm chart rendered by the real helm binary: lint, CRD identity, RBAC shape, security, HA, policy."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from seedfork_api import contract, crd
from seedfork_api.spec import TransferSpec
from seedfork_operator import rbac
from seedfork_operator.__main__ import parse_args
from seedfork_operator.config import parse_transfer_defaults

# The first test that needs helm builds it once from the Go module proxy (minutes, cold).
pytestmark = pytest.mark.timeout(900)


def test_chart_crd_is_the_generated_crd_byte_for_byte(tools):
    top = tools.REPO / "crds" / "seedfork.io_modelreplicasets.yaml"
    in_chart = tools.CHART / "crds" / "seedfork.io_modelreplicasets.yaml"
    assert in_chart.read_bytes() == top.read_bytes(), "copy crds/seedfork.io_modelreplicasets.yaml into the chart"


def test_helm_lint_strict_passes(tools, helm_bin):
    out = tools.run([helm_bin, "lint", "--strict", tools.CHART, "--kube-version", tools.KUBE_VERSION])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_operator_pod_is_locked_down(tools, helm_bin):
    docs = tools.helm_template(helm_bin)
    (deploy,) = tools.by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # Probes hit kopf's liveness endpoint on the port the container declares for it.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
        assert f"--liveness=http://0.0.0.0:{ports['health']}{container[probe]['httpGet']['path']}" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert pod["serviceAccountName"] == "sf-seedfork"


def _rules(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


OPERATOR_NAMESPACED = {
    ("", "pods"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods/status"): {"get", "patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("seedfork.io", "modelreplicasets"): {"get", "list", "watch", "patch", "update"},
    ("seedfork.io", "modelreplicasets/status"): {"get", "patch", "update"},
}
CLUSTER_READS = {
    ("", "nodes"): {"get"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


def test_no_wildcards_anywhere_in_rbac(tools, helm_bin):
    for args in ([], ["--set", "rbac.clusterWide=false", "--set", "operator.replicas=2"]):
        docs = tools.helm_template(helm_bin, *args)
        for role in tools.by_kind(docs, "ClusterRole") + tools.by_kind(docs, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]


def test_cluster_wide_rbac_is_exactly_what_the_operator_needs(tools, helm_bin):
    docs = tools.helm_template(helm_bin)
    roles = {r["metadata"]["name"]: _rules(r) for r in tools.by_kind(docs, "ClusterRole")}
    assert roles["sf-seedfork"] == OPERATOR_NAMESPACED
    assert roles["sf-seedfork-cluster"] == {
        **CLUSTER_READS,
        ("", "namespaces"): {"list", "watch"},
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    }
    assert not tools.by_kind(docs, "Role") or all(
        r["metadata"]["name"].endswith("-agent") for r in docs if r["kind"] == "Role"
    )
    (deploy,) = tools.by_kind(docs, "Deployment")
    assert "--all-namespaces" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def test_namespaced_rbac_grants_nothing_namespaced_cluster_wide(tools, helm_bin):
    docs = tools.helm_template(helm_bin, "--set", "rbac.clusterWide=false", "--set", "watchNamespaces={team-a,team-b}")
    (cluster_role,) = tools.by_kind(docs, "ClusterRole")
    # No pods or secrets anywhere cluster-wide; reads of nodes, CRDs and namespace names only.
    assert _rules(cluster_role) == {**CLUSTER_READS, ("", "namespaces"): {"list", "watch"}}
    operator_roles = [r for r in tools.by_kind(docs, "Role") if r["metadata"]["name"] == "sf-seedfork"]
    assert sorted(r["metadata"]["namespace"] for r in operator_roles) == ["team-a", "team-b"]
    assert all(_rules(r) == OPERATOR_NAMESPACED for r in operator_roles)
    bindings = [b for b in tools.by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "sf-seedfork"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"seedfork-system"}
    args = tools.by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    # Engine pods of both namespaces get the agent account and its Role.
    agent_roles = [r for r in tools.by_kind(docs, "Role") if r["metadata"]["name"] == "sf-seedfork-agent"]
    assert sorted(r["metadata"]["namespace"] for r in agent_roles) == ["team-a", "team-b"]
    assert all(_rules(r) == {("", "pods"): {"get", "watch", "patch"}, ("", "events"): {"create"}} for r in agent_roles)
    sas = [
        s["metadata"]["namespace"]
        for s in tools.by_kind(docs, "ServiceAccount")
        if s["metadata"]["name"] == "seedfork-agent"
    ]
    assert sorted(sas) == ["team-a", "team-b"]


def test_a_standalone_operator_is_never_two_at_once_during_an_upgrade(tools, helm_bin):
    """Standalone there is no peering: a rolling update's surge would run two writers for a while."""
    (deploy,) = tools.by_kind(tools.helm_template(helm_bin), "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    (deploy,) = tools.by_kind(tools.helm_template(helm_bin, "--set", "operator.replicas=2"), "Deployment")
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"  # peering keeps one active


def test_two_replicas_peer_with_distinct_priorities(tools, helm_bin, tmp_path):
    docs = tools.helm_template(helm_bin, "--set", "operator.replicas=2")
    (deploy,) = tools.by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    (peering,) = tools.by_kind(docs, "ClusterKopfPeering")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script, argv0, *flags = container["args"]
    assert "--standalone" not in flags and "--all-namespaces" in flags
    # Run the real start-up script with a stand-in for the operator that prints its arguments,
    # once per pod name: the priorities must differ, the peering name must be the chart's.
    (tmp_path / "seedfork-operator").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "seedfork-operator").chmod(0o755)
    priorities = set()
    for pod in ("sf-seedfork-7d9c-abcde", "sf-seedfork-7d9c-fghij"):
        (tmp_path / "hostname").write_text(pod + "\n")
        patched = script.replace("/etc/hostname", str(tmp_path / "hostname"))
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
        out = subprocess.run(["/bin/sh", "-c", patched, argv0, *flags], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        assert f"--peering={peering['metadata']['name']}" in words
        assert "--all-namespaces" in words
        parsed = parse_args(words)  # the operator's own command line accepts them
        assert parsed.peering == peering["metadata"]["name"] and parsed.all_namespaces and not parsed.standalone
        assert parsed.priority > 0
        priorities.add(parsed.priority)
    assert len(priorities) == 2
    # Namespaced peering objects live in the watched namespaces, and the Role may patch them.
    docs = tools.helm_template(helm_bin, "--set", "operator.replicas=2", "--set", "rbac.clusterWide=false")
    (peering,) = tools.by_kind(docs, "KopfPeering")
    assert peering["metadata"]["namespace"] == "seedfork-system"
    role = next(r for r in tools.by_kind(docs, "Role") if r["metadata"]["name"] == "sf-seedfork")
    assert _rules(role)[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}


def _weight_ports(policy: dict) -> list[dict]:
    weights = policy["spec"]["ingress"][0]
    assert weights["from"] == [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]
    return weights["ports"]


def test_network_policy_opens_exactly_the_ports_a_sets_pods_listen_on(tools, helm_bin):
    """The agent port and spec.transfer.ports hold every agent listener (TransferEngine's and the rendezvous
    ports, as the contract shares the range out); nccl sets add the kernel-picked ports of gloo/NCCL pair
    connections, SGLang sets over TransferEngine the ports of SGLang's own Mooncake engine."""
    docs = tools.helm_template(
        helm_bin,
        "--set", "networkPolicy.modelReplicaSets[0].name=te",
        "--set", "networkPolicy.modelReplicaSets[1].name=gloo",
        "--set", "networkPolicy.modelReplicaSets[1].backend=nccl",
        "--set", "networkPolicy.modelReplicaSets[2].name=sgl",
        "--set", "networkPolicy.modelReplicaSets[2].engine=sglang",
        "--set", "networkPolicy.modelReplicaSets[3].name=sgl-nccl",
        "--set", "networkPolicy.modelReplicaSets[3].engine=sglang",
        "--set", "networkPolicy.modelReplicaSets[3].backend=nccl",
    )  # fmt: skip
    policies = {p["metadata"]["name"]: p for p in tools.by_kind(docs, "NetworkPolicy")}
    spec = TransferSpec()
    agent = {"protocol": "TCP", "port": spec.agent_port}
    transfer = {"protocol": "TCP", "port": spec.ports.start, "endPort": spec.ports.end}
    kernel = {"protocol": "TCP", "port": 32768, "endPort": 60999}
    assert _weight_ports(policies["sf-seedfork-te"]) == [agent, transfer]
    assert _weight_ports(policies["sf-seedfork-gloo"]) == [agent, transfer, kernel]
    assert _weight_ports(policies["sf-seedfork-sgl"]) == [
        agent,
        transfer,
        {"protocol": "TCP", "port": 15000, "endPort": 17000},
    ]
    assert _weight_ports(policies["sf-seedfork-sgl-nccl"]) == [agent, transfer, kernel]
    # Every listener the contract places for one rank lies inside the opened range.
    te_lo, te_hi = contract.transfer_engine_ports(spec.ports.start, spec.ports.end)
    g_lo, g_hi = contract.group_ports(spec.ports.start, spec.ports.end)
    assert spec.ports.start == g_lo <= g_hi < te_lo <= te_hi == spec.ports.end
    # The cluster's transferDefaults.backend decides for sets that name none.
    docs = tools.helm_template(
        helm_bin, "--set", "networkPolicy.modelReplicaSets[0].name=te", "--set", "transferDefaults.backend=nccl"
    )
    (policy,) = [p for p in tools.by_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "sf-seedfork-te"]
    assert _weight_ports(policy) == [agent, transfer, kernel]


def test_network_policy_admits_only_the_same_set_to_weight_ports(tools, helm_bin):
    docs = tools.helm_template(
        helm_bin,
        "--set", "networkPolicy.modelReplicaSets[0].name=llama",
        "--set", "networkPolicy.modelReplicaSets[0].namespace=team-a",
        "--set", "networkPolicy.modelReplicaSets[1].name=qwen",
        "--set", "networkPolicy.modelReplicaSets[1].agentPort=19000",
        "--set", "networkPolicy.modelReplicaSets[1].ports.start=41000",
        "--set", "networkPolicy.modelReplicaSets[1].ports.end=41015",
        "--set", "networkPolicy.modelReplicaSets[1].enginePort=8000",
    )  # fmt: skip
    policies = {p["metadata"]["name"]: p for p in tools.by_kind(docs, "NetworkPolicy")}
    llama, qwen = policies["sf-seedfork-llama"], policies["sf-seedfork-qwen"]
    assert llama["metadata"]["namespace"] == "team-a"
    assert llama["spec"]["podSelector"] == {"matchLabels": {"seedfork.io/set": "llama"}}
    weights, engine = llama["spec"]["ingress"]
    assert weights["from"] == [{"podSelector": {"matchLabels": {"seedfork.io/set": "llama"}}}]
    assert weights["ports"] == [
        {"protocol": "TCP", "port": 18080},
        {"protocol": "TCP", "port": 28000, "endPort": 28099},
    ]
    assert engine == {"ports": [{"protocol": "TCP", "port": 30000}]}
    q_weights, q_engine = qwen["spec"]["ingress"]
    assert q_weights["from"] == [{"podSelector": {"matchLabels": {"seedfork.io/set": "qwen"}}}]
    assert q_weights["ports"] == [
        {"protocol": "TCP", "port": 19000},
        {"protocol": "TCP", "port": 41000, "endPort": 41015},
    ]
    assert q_engine["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert policies["sf-seedfork-operator"]["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8081}]}
    ]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "operator.replicas=two"], "/operator/replicas"),
        (["--set", "rbac.clusterwide=false"], "clusterwide"),
        (["--set", "image.digest=latest"], "/image/digest"),
        (["--set", "networkPolicy.defaults.agentPort=80"], "/networkPolicy/defaults/agentPort"),
        (["--set", "watchNamespaces={Bad_Name}"], "/watchNamespaces/0"),
        (["--set", "transferDefaults.backend=pigeon"], "/transferDefaults/backend"),
        (["--set", "metrics.serviceMonitor.interval=thirty seconds"], "/metrics/serviceMonitor/interval"),
        (["--set", "transferDefaults.agentPort=19000"], "agentPort"),  # ports are per set, not cluster policy
    ],
)
def test_values_schema_rejects_bad_values(tools, helm_bin, args, complaint):
    proc = tools.helm_template(helm_bin, *args, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr


def test_digest_pins_both_images(tools, helm_bin):
    digest = "sha256:" + "a" * 64
    docs = tools.helm_template(helm_bin, "--set", f"image.digest={digest}", "--set", f"agent.image.digest={digest}")
    container = tools.by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"seedfork/operator@{digest}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SEEDFORK_AGENT_IMAGE"] == f"seedfork/agent@{digest}"


@pytest.mark.parametrize(
    "args",
    [[], ["--set", "rbac.clusterWide=false", "--set", "watchNamespaces={a,b}", "--set", "operator.verbose=true"]],
)
def test_operator_command_line_is_one_the_operator_accepts(tools, helm_bin, args):
    container = tools.by_kind(tools.helm_template(helm_bin, *args), "Deployment")[0]["spec"]["template"]["spec"]
    container = container["containers"][0]
    assert container["command"] == ["seedfork-operator"]
    parsed = parse_args(container["args"])
    assert parsed.standalone and parsed.metrics_port == 8080 and parsed.liveness
    if args:
        assert parsed.namespace == ["a", "b"] and not parsed.all_namespaces and parsed.verbose
    else:
        assert parsed.all_namespaces and parsed.namespace is None


def _expand(rules) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_chart_rbac_matches_the_operators_documented_permissions(tools, helm_bin):
    """The operator lists what it calls (seedfork_operator.rbac); the chart grants that, per mode, and no more."""
    documented = _expand(rbac.RULES)
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    cluster_peering = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    modes = {
        # --all-namespaces: kopf peers through ClusterKopfPeering, never the namespaced kind.
        ("--set", "operator.replicas=2"): documented - peering,
        # --namespace: no cluster-wide peering (namespaces list/watch stays: kopf follows them anyway).
        ("--set", "operator.replicas=2", "--set", "rbac.clusterWide=false"): documented - cluster_peering,
        ("--set", "rbac.clusterWide=false"): documented - cluster_peering - peering,
    }
    for args, expected in modes.items():
        docs = tools.helm_template(helm_bin, *args)
        granted = set()
        for role in tools.by_kind(docs, "ClusterRole") + tools.by_kind(docs, "Role"):
            if not role["metadata"]["name"].endswith("-agent"):
                granted |= _expand(role["rules"])
        assert granted == expected, args


def test_transfer_defaults_reach_the_operator_as_a_policy_it_accepts(tools, helm_bin):
    docs = tools.helm_template(
        helm_bin, "--set", "transferDefaults.backend=nccl", "--set", "transferDefaults.retries=3",
        "--set", "transferDefaults.topologyKeys={topology.kubernetes.io/zone}",
    )  # fmt: skip
    container = tools.by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    policy = parse_transfer_defaults(env["SEEDFORK_TRANSFER_DEFAULTS"])
    assert (policy.backend, policy.retries, policy.topology_keys) == ("nccl", 3, ["topology.kubernetes.io/zone"])
    plain = tools.by_kind(tools.helm_template(helm_bin), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "SEEDFORK_TRANSFER_DEFAULTS" not in {e["name"] for e in plain["env"]}


def test_values_schema_offers_exactly_the_crds_cluster_defaulted_fields(tools):
    """The chart's transferDefaults schema is the CRD's, for the fields a cluster may default."""
    schema = json.loads((tools.CHART / "values.schema.json").read_text())["properties"]["transferDefaults"]
    crd_fields = crd.spec_schema()["properties"]["transfer"]["properties"]
    wanted = [TransferSpec.model_fields[f].alias for f in TransferSpec.CLUSTER_DEFAULTED]
    assert schema["properties"] == {f: crd_fields[f] for f in wanted}
