"""The pod runner's scheduler/kubelet rules, as pure functions (no cluster needed)."""

from __future__ import annotations

import pytest

from seedfork_localdev.podrules import (
    ContainerConfigError,
    NodeSpec,
    ProbeState,
    choose_node,
    container_argv,
    container_env,
    expand_refs,
    pod_phase,
    readiness_conditions,
    restart_delay,
    should_restart,
    status_signature,
    termination_grace,
)

GATE = "seedfork.io/weights-ready"
POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": {"nodeName": "n1"}}


def test_node_spec_parsing_and_default_labels():
    node = NodeSpec.parse("gpu-1:topology.kubernetes.io/zone=z1,pool=a")
    assert node.name == "gpu-1"
    assert node.all_labels() == {
        "kubernetes.io/hostname": "gpu-1",
        "kubernetes.io/os": "linux",
        "topology.kubernetes.io/zone": "z1",
        "pool": "a",
    }
    assert NodeSpec.parse({"name": "b", "labels": {"x": "y"}}).labels == {"x": "y"}
    with pytest.raises(ValueError, match="name"):
        NodeSpec.parse({"labels": {}})
    with pytest.raises(ValueError):
        NodeSpec.parse({"name": "a", "taints": []})


def test_choose_node_least_loaded_matching_selector():
    nodes = [NodeSpec("a", {"zone": "z1"}), NodeSpec("b", {"zone": "z2"}), NodeSpec("c", {"zone": "z1"})]
    assert choose_node(nodes, None, {}) == "a"  # ties go to the earlier node
    assert choose_node(nodes, None, {"a": 1}) == "b"
    assert choose_node(nodes, None, {"a": 1, "b": 1}) == "c"
    assert choose_node(nodes, {"zone": "z1"}, {"a": 2, "c": 1}) == "c"
    assert choose_node(nodes, {"kubernetes.io/hostname": "b"}, {"b": 9}) == "b"
    assert choose_node(nodes, {"zone": "z9"}, {}) is None


def test_expand_refs_like_kubernetes():
    env = {"A": "1", "B": "two"}
    assert expand_refs("$(A)-$(B)", env) == "1-two"
    assert expand_refs("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand_refs("$$(A) is escaped, $$ too", env) == "$(A) is escaped, $ too"


def test_container_env_sources_in_order():
    container = {
        "name": "c",
        "env": [
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "URL", "value": "http://$(IP):80/$(LATER)"},
            {"name": "LATER", "value": "x"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nope", "optional": True}}},
            {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
        ],
    }
    secrets = {("s", "token"): "tok"}
    env = container_env(
        POD,
        container,
        pod_ip="127.0.0.7",
        host_ip="127.0.0.1",
        secret_value=lambda n, k: secrets.get((n, k)),
        config_map_value=lambda n, k: "cmv" if (n, k) == ("cm", "k") else None,
    )
    assert env == {
        "IP": "127.0.0.7",
        "NAME": "p",
        "UID": "u-1",
        "NODE": "n1",
        "URL": "http://127.0.0.7:80/$(LATER)",  # only earlier variables are visible
        "LATER": "x",
        "TOKEN": "tok",
        "CM": "cmv",
    }


@pytest.mark.parametrize(
    ("container", "match"),
    [
        ({"name": "c", "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, "no key"),
        (
            {"name": "c", "env": [{"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]},
            "fieldRef",
        ),
        (
            {"name": "c", "env": [{"name": "R", "valueFrom": {"resourceFieldRef": {"resource": "cpu"}}}]},
            "not supported",
        ),
        ({"name": "c", "envFrom": [{"secretRef": {"name": "s"}}]}, "envFrom"),
    ],
)
def test_container_env_fails_clearly(container, match):
    with pytest.raises(ContainerConfigError, match=match):
        container_env(
            POD, container, pod_ip="i", host_ip="h", secret_value=lambda n, k: None, config_map_value=lambda n, k: None
        )


def test_container_argv_needs_a_command():
    assert container_argv({"name": "c", "command": ["echo"], "args": ["$(X)", "y"]}, {"X": "1"}) == ["echo", "1", "y"]
    with pytest.raises(ContainerConfigError, match="no command"):
        container_argv({"name": "c", "image": "img", "args": ["x"]}, {})


def test_restart_rules():
    assert should_restart("Always", 0) and should_restart("Always", 1)
    assert should_restart("OnFailure", 2) and not should_restart("OnFailure", 0)
    assert not should_restart("Never", 1)
    assert [restart_delay(n, 1.0, 5.0) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_pod_phase():
    assert pod_phase([]) == "Pending"
    assert pod_phase([("waiting", None, True), ("running", None, True)]) == "Pending"
    assert pod_phase([("running", None, True), ("stopped", 0, False)]) == "Running"
    assert pod_phase([("stopped", 1, True)]) == "Running"  # crash-looping under Always
    assert pod_phase([("stopped", 0, False), ("stopped", 0, False)]) == "Succeeded"
    assert pod_phase([("stopped", 0, False), ("stopped", 3, False)]) == "Failed"


def test_probe_thresholds():
    state = ProbeState(success_threshold=2, failure_threshold=2)
    assert [state.record(ok) for ok in (True, True, False, True, False, False)] == [
        False,
        True,
        True,  # one failure is below the failure threshold
        True,
        True,
        False,
    ]


def _types(conds):
    return {c["type"]: c for c in conds}


def test_ready_needs_containers_and_every_gate():
    gates = [{"conditionType": GATE}]
    conds = _types(readiness_conditions([], gates, {"a": True}, "T1"))
    assert conds["ContainersReady"]["status"] == "True"
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "ReadinessGatesNotReady"
    assert GATE not in conds, "gate conditions are never written by the runner"

    observed = [{"type": GATE, "status": "False"}]
    assert _types(readiness_conditions(observed, gates, {"a": True}, "T1"))["Ready"]["status"] == "False"
    observed = [{"type": GATE, "status": "True"}]
    assert _types(readiness_conditions(observed, gates, {"a": True}, "T1"))["Ready"]["status"] == "True"
    conds = _types(readiness_conditions(observed, gates, {"a": True, "b": False}, "T1"))
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["message"].endswith("[b]")
    assert _types(readiness_conditions([], [], {"a": True}, "T1"))["Ready"]["status"] == "True"
    assert _types(readiness_conditions([], [], {}, "T1"))["Ready"]["status"] == "False"


def test_transition_time_kept_while_status_unchanged():
    observed = [{"type": "Ready", "status": "True", "lastTransitionTime": "T0"}]
    assert _types(readiness_conditions(observed, [], {"a": True}, "T1"))["Ready"]["lastTransitionTime"] == "T0"
    assert _types(readiness_conditions(observed, [], {"a": False}, "T1"))["Ready"]["lastTransitionTime"] == "T1"


def test_an_image_stand_in_puts_its_environment_first():
    from seedfork_localdev.podrules import image_env, image_repository

    registry = "registry.example.com:5000"  # a port in the registry is no tag
    assert image_repository(f"{registry}/seedfork/vllm:0.32.0") == f"{registry}/seedfork/vllm"
    assert image_repository("seedfork/vllm@sha256:" + "0" * 64) == "seedfork/vllm"
    assert image_repository("vllm") == "vllm" and image_repository(None) == ""
    images = {"seedfork/vllm": {"PATH": "/envs/vllm/bin", "PYTHONPATH": "/src/agent"}}
    assert image_env("seedfork/vllm:0.32.0", images, "/usr/bin") == {
        "PATH": "/envs/vllm/bin:/usr/bin",
        "PYTHONPATH": "/src/agent",
    }
    assert image_env("seedfork/agent:dev", images, "/usr/bin") == {}  # other images run as before


def test_empty_dir_paths_in_env_point_to_a_directory_of_the_pod(tmp_path):
    from seedfork_localdev.podrules import empty_dir_env

    pod = {"spec": {"volumes": [{"name": "cache", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}},
                                {"name": "models", "hostPath": {"path": "/models"}}]}}  # fmt: skip
    container = {"volumeMounts": [{"name": "cache", "mountPath": "/var/cache/x/"},
                                  {"name": "shm", "mountPath": "/dev/shm"},
                                  {"name": "models", "mountPath": "/models"}]}  # fmt: skip
    env = {"A": "/var/cache/x", "B": "/var/cache/x/vllm", "C": "/var/cache/xy", "D": "/dev/shm/s", "E": "/models/m"}
    got = empty_dir_env(pod, container, env, tmp_path / "pod-1")
    assert got == {"A": str(tmp_path / "pod-1" / "cache"), "B": str(tmp_path / "pod-1" / "cache" / "vllm")}
    assert (tmp_path / "pod-1" / "cache").is_dir()
    assert empty_dir_env(pod, {"volumeMounts": []}, env, tmp_path / "pod-2") == {}  # mounted elsewhere only


def test_termination_grace_is_the_deletions_then_the_pods_then_30_capped():
    deleting = {"metadata": {"deletionGracePeriodSeconds": 7}, "spec": {"terminationGracePeriodSeconds": 60}}
    assert termination_grace(deleting, None) == 7.0
    assert termination_grace({"spec": {"terminationGracePeriodSeconds": 60}}, None) == 60.0
    assert termination_grace({}, None) == 30.0
    assert termination_grace(deleting, 2.0) == 2.0


def test_status_signature_ignores_times_and_others_conditions():
    status = {
        "phase": "Running",
        "podIP": "127.0.0.2",
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "seedfork.io/weights-ready", "status": "True"},
        ],
        "containerStatuses": [{"name": "e", "ready": True, "restartCount": 0, "state": {"running": {}}}],
    }
    later_ready = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-02T00:00:00Z"}
    later = {**status, "conditions": [later_ready]}
    assert status_signature(status) == status_signature(later)
    restarted = {**status, "containerStatuses": [{**status["containerStatuses"][0], "restartCount": 1}]}
    assert status_signature(status) != status_signature(restarted)
