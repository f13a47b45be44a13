"""The local pod runner against the real local kube-apiserver: pods are real processes on 127.0.0.x."""

from __future__ import annotations

import ipaddress
import time

import pytest
from kubernetes.client import ApiException

from seedfork_api.contract import READINESS_GATE

pytestmark = pytest.mark.cluster

SMP = "application/strategic-merge-patch+json"


def read(core, namespace, name):
    return core.read_namespaced_pod(name, namespace)


def test_pod_gets_own_ip_runs_and_becomes_ready_by_its_probe(core, namespace, make_runner, h):
    runner = make_runner([namespace])
    core.create_namespaced_pod(namespace, h.server_pod("web", env=[{"name": "START_UNREADY", "value": "1"}]))

    pod = h.wait_for(lambda: (p := read(core, namespace, "web")).status.phase == "Running" and p, what="Running")
    ip = pod.status.pod_ip
    assert ip == runner.pod_ip(namespace, "web")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.0.0/8") and ip != "127.0.0.1"
    assert [i.ip for i in pod.status.pod_ips] == [ip]
    assert pod.status.host_ip == "127.0.0.1" and pod.status.start_time is not None
    assert pod.spec.node_name == "local-node"

    # The process runs on the pod IP with the downward-API env; the probe fails (503) so it is not Ready.
    served = h.wait_for(lambda: _try_get(h, ip), what="server answering on the pod IP")
    assert served["env"]["POD_IP"] == ip
    assert served["env"]["POD_NAME"] == "web" and served["env"]["POD_NAMESPACE"] == namespace
    assert served["env"]["NODE_NAME"] == "local-node"
    assert served["pid"] == runner.container_pids(namespace, "web")["server"]
    time.sleep(1.0)  # several probe periods
    pod = read(core, namespace, "web")
    assert h.conditions(pod)["ContainersReady"] == "False" and h.conditions(pod)["Ready"] == "False"
    assert pod.status.container_statuses[0].ready is False
    assert pod.status.container_statuses[0].state.running is not None

    _try_get(h, ip, "/make-ready")
    pod = h.wait_for(lambda: (p := read(core, namespace, "web")) and h.conditions(p).get("Ready") == "True" and p)
    assert h.conditions(pod)["ContainersReady"] == "True"
    assert pod.status.container_statuses[0].ready is True
    assert "serving on " + ip in runner.log_path(namespace, "web", "server").read_text()


def _try_get(h, ip, path="/"):
    try:
        return h.get_json(ip, path)
    except (OSError, ValueError):
        return None


def test_readiness_gate_keeps_pod_unready_until_its_condition_is_true(core, namespace, make_runner, h):
    make_runner([namespace])
    pod = h.server_pod("gated", probe=False, readinessGates=[{"conditionType": READINESS_GATE}])
    core.create_namespaced_pod(namespace, pod)

    got = h.wait_for(
        lambda: (p := read(core, namespace, "gated")) and h.conditions(p).get("ContainersReady") == "True" and p
    )
    time.sleep(0.5)
    got = read(core, namespace, "gated")
    conds = h.conditions(got)
    assert conds["Ready"] == "False"
    assert READINESS_GATE not in conds, "the runner must never set the weights-ready gate"
    ready = next(c for c in got.status.conditions if c.type == "Ready")
    assert ready.reason == "ReadinessGatesNotReady"

    def set_gate(status):
        body = {"status": {"conditions": [{"type": READINESS_GATE, "status": status}]}}
        core.patch_namespaced_pod_status("gated", namespace, body, _content_type=SMP)

    set_gate("True")
    h.wait_for(lambda: h.conditions(read(core, namespace, "gated")).get("Ready") == "True", what="Ready after gate")
    time.sleep(0.5)  # the runner keeps writing status; the gate condition must survive it
    assert h.conditions(read(core, namespace, "gated"))[READINESS_GATE] == "True"

    set_gate("False")
    h.wait_for(lambda: h.conditions(read(core, namespace, "gated")).get("Ready") == "False", what="unready again")
    assert h.conditions(read(core, namespace, "gated"))[READINESS_GATE] == "False"


def test_env_from_secret_literal_and_references(core, namespace, make_runner, h):
    make_runner([namespace], env={"FROM_RUNNER": "r", "GREETING": "overridden by the pod"})
    env = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "GREETING", "value": "hello $(POD_NAME) at $(POD_IP), $$(kept)"},
    ]
    core.create_namespaced_pod(namespace, h.server_pod("envpod", env=env, probe=False))

    # The Secret does not exist yet: the container waits with the kubelet's reason, and starts once it appears.
    def waiting_reason():
        statuses = read(core, namespace, "envpod").status.container_statuses or []
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    assert h.wait_for(waiting_reason) == "CreateContainerConfigError"
    status = read(core, namespace, "envpod").status
    assert "creds" in status.container_statuses[0].state.waiting.message and status.phase == "Pending"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret-value"}})

    pod = h.wait_for(lambda: (p := read(core, namespace, "envpod")).status.phase == "Running" and p, timeout=20)
    served = h.wait_for(lambda: _try_get(h, pod.status.pod_ip))
    assert served["env"]["TOKEN"] == "s3cret-value"
    assert served["env"]["GREETING"] == f"hello envpod at {pod.status.pod_ip}, $(kept)"
    assert served["env"]["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert served["env"]["FROM_RUNNER"] == "r"
    assert "KUBECONFIG" not in served["env"], "a pod without a ServiceAccount gets no API credentials"


def test_unsupported_env_source_fails_clearly(core, namespace, make_runner, h):
    make_runner([namespace])
    env = [{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]
    core.create_namespaced_pod(namespace, h.server_pod("badenv", env=env, probe=False))

    def waiting():
        statuses = read(core, namespace, "badenv").status.container_statuses or []
        return statuses and statuses[0].state.waiting

    state = h.wait_for(waiting)
    assert state.reason == "CreateContainerConfigError"
    assert "resourceFieldRef" in state.message and "not supported" in state.message


def test_service_account_pod_gets_a_bound_token_with_its_rbac(core, namespace, make_runner, h, api_client):
    from kubernetes import client

    runner = make_runner([namespace])
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        namespace,
        {"metadata": {"name": "pods"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    # The container reads its own pod through the API with its token, then is denied listing secrets.
    script = (
        "import os; from kubernetes import client, config\n"
        "api = client.CoreV1Api(config.new_client_from_config(os.environ['KUBECONFIG']))\n"
        "print('own pod', api.read_namespaced_pod(os.environ['HOSTNAME'], os.environ['NS']).metadata.name)\n"
        "try:\n    api.list_namespaced_secret(os.environ['NS'])\nexcept client.ApiException as e:\n"
        "    print('secrets', e.status)\n"
    )
    pod = h.command_pod("sa", ["python", "-c", script], serviceAccountName="reader", restartPolicy="Never")
    pod["spec"]["containers"][0]["env"] = [
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]
    core.create_namespaced_pod(namespace, pod)

    h.wait_for(lambda: read(core, namespace, "sa").status.phase in ("Succeeded", "Failed"), timeout=30)
    pod = read(core, namespace, "sa")
    text = runner.log_path(namespace, "sa", "main").read_text()
    assert pod.status.phase == "Succeeded", text
    assert "own pod sa" in text and "secrets 403" in text


def test_deleting_a_pod_kills_its_processes_and_removes_it(core, namespace, make_runner, h):
    runner = make_runner([namespace], max_grace=1.0)
    # IGNORE_TERM: the server survives SIGTERM, so the runner has to escalate to SIGKILL after the grace period.
    core.create_namespaced_pod(
        namespace,
        h.server_pod("doomed", env=[{"name": "IGNORE_TERM", "value": "1"}], terminationGracePeriodSeconds=30),
    )
    h.wait_for(lambda: h.conditions(read(core, namespace, "doomed")).get("Ready") == "True", what="Ready")
    pid = runner.container_pids(namespace, "doomed")["server"]
    ip = runner.pod_ip(namespace, "doomed")
    assert h.alive(pid)

    core.delete_namespaced_pod("doomed", namespace)  # graceful, like kubectl delete
    pod = read(core, namespace, "doomed")
    assert pod.metadata.deletion_timestamp is not None  # no kubelet confirmed it yet

    def gone():
        try:
            read(core, namespace, "doomed")
        except ApiException as exc:
            return exc.status == 404
        return False

    h.wait_for(gone, timeout=15, what="pod object removed")
    assert not h.alive(pid)
    assert runner.pod_ip(namespace, "doomed") is None
    # The address is free again: the next pod gets it.
    core.create_namespaced_pod(namespace, h.server_pod("next", probe=False))
    assert h.wait_for(lambda: runner.pod_ip(namespace, "next")) == ip


def test_force_deleted_pod_processes_are_killed(core, namespace, make_runner, h, tmp_path):
    runner = make_runner([namespace])
    child_file = tmp_path / "escaped.pid"
    # The container starts a process in a new session: outside its group, yet it must end with the pod.
    script = (
        "import subprocess, time; d = subprocess.Popen(['sleep', '302'], start_new_session=True)\n"
        f"open({str(child_file)!r}, 'w').write(str(d.pid)); time.sleep(300)"
    )
    core.create_namespaced_pod(namespace, h.command_pod("forced", ["python", "-c", script]))
    pid = h.wait_for(lambda: runner.container_pids(namespace, "forced").get("main"))
    escaped = int(h.wait_for(lambda: child_file.exists() and child_file.read_text()))
    assert h.alive(escaped)
    # grace 0 removes the object at once (kubectl delete --force): the runner only sees DELETED.
    core.delete_namespaced_pod("forced", namespace, body={"gracePeriodSeconds": 0})
    assert _absent(core, namespace, "forced")
    h.wait_for(lambda: not h.alive(pid) and not h.alive(escaped), what="processes killed after a forced delete")
    h.wait_for(lambda: runner.pod_ip(namespace, "forced") is None, what="address freed")


def test_pod_recreated_under_the_same_name_runs_afresh(core, namespace, make_runner, h):
    runner = make_runner([namespace])
    core.create_namespaced_pod(namespace, h.server_pod("same", env=[{"name": "GEN", "value": "1"}]))
    first = h.wait_for(lambda: (p := read(core, namespace, "same")) and h.conditions(p).get("Ready") == "True" and p)
    old_pid = runner.container_pids(namespace, "same")["server"]

    core.delete_namespaced_pod("same", namespace)
    h.wait_for(lambda: _absent(core, namespace, "same"), what="old pod removed")
    core.create_namespaced_pod(namespace, h.server_pod("same", env=[{"name": "GEN", "value": "2"}]))
    second = h.wait_for(
        lambda: (p := read(core, namespace, "same")) and h.conditions(p).get("Ready") == "True" and p, what="new Ready"
    )
    assert second.metadata.uid != first.metadata.uid and second.spec.node_name == "local-node"
    assert h.get_json(second.status.pod_ip)["env"]["GEN"] == "2"
    assert not h.alive(old_pid)


def _absent(core, namespace, name):
    try:
        read(core, namespace, name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_two_pods_on_two_nodes_get_distinct_ips_and_both_serve(core, namespace, make_runner, h):
    zone = "topology.kubernetes.io/zone"
    nodes = [{"name": f"{namespace}-a", "labels": {zone: "z1"}}, {"name": f"{namespace}-b", "labels": {zone: "z2"}}]
    runner = make_runner([namespace], nodes=nodes)
    for node in nodes:
        got = core.read_node(node["name"])
        assert got.metadata.labels["kubernetes.io/hostname"] == node["name"]
        assert got.metadata.labels[zone] == node["labels"][zone]
        assert {c.type: c.status for c in got.status.conditions}["Ready"] == "True"

    for name in ("one", "two"):
        core.create_namespaced_pod(namespace, h.server_pod(name))
    pods = [
        h.wait_for(lambda n=name: (p := read(core, namespace, n)) and h.conditions(p).get("Ready") == "True" and p)
        for name in ("one", "two")
    ]
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == 2
    assert {p.spec.node_name for p in pods} == {n["name"] for n in nodes}, "least-loaded binding spreads the pods"
    for pod in pods:
        served = h.get_json(pod.status.pod_ip)
        assert served["env"]["POD_NAME"] == pod.metadata.name and served["env"]["POD_IP"] == pod.status.pod_ip

    # A nodeSelector is honoured; a selector no node matches leaves the pod unscheduled.
    core.create_namespaced_pod(namespace, h.server_pod("zoned", probe=False, nodeSelector={zone: "z2"}))
    core.create_namespaced_pod(namespace, h.server_pod("nowhere", probe=False, nodeSelector={zone: "z9"}))
    h.wait_for(lambda: read(core, namespace, "zoned").spec.node_name == f"{namespace}-b")

    def unschedulable():
        conds = read(core, namespace, "nowhere").status.conditions or []
        return next((c for c in conds if c.type == "PodScheduled"), None)

    scheduled = h.wait_for(unschedulable, what="PodScheduled condition")
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable"
    assert read(core, namespace, "nowhere").spec.node_name is None
    assert runner.pod_ip(namespace, "nowhere") is None


def test_restart_policies(core, namespace, make_runner, h):
    make_runner([namespace])
    core.create_namespaced_pod(
        namespace, h.command_pod("never", ["python", "-c", "raise SystemExit(3)"], restartPolicy="Never")
    )
    core.create_namespaced_pod(
        namespace, h.command_pod("ok", ["python", "-c", "print('done')"], restartPolicy="OnFailure")
    )
    core.create_namespaced_pod(
        namespace, h.command_pod("loop", ["python", "-c", "raise SystemExit(1)"], restartPolicy="Always")
    )
    core.create_namespaced_pod(namespace, h.command_pod("nocmd", ["/nonexistent/binary"], restartPolicy="Never"))

    failed = h.wait_for(lambda: (p := read(core, namespace, "never")).status.phase == "Failed" and p)
    term = failed.status.container_statuses[0].state.terminated
    assert term.exit_code == 3 and term.reason == "Error"
    assert h.wait_for(lambda: read(core, namespace, "ok").status.phase == "Succeeded")

    def restarts():
        statuses = read(core, namespace, "loop").status.container_statuses or []
        return statuses and statuses[0].restart_count >= 2 and statuses[0]

    status = h.wait_for(restarts, timeout=20)
    assert read(core, namespace, "loop").status.phase == "Running"
    assert status.last_state.terminated.exit_code == 1

    missing = h.wait_for(lambda: (p := read(core, namespace, "nocmd")).status.phase == "Failed" and p)
    term = missing.status.container_statuses[0].state.terminated
    assert term.reason == "StartError" and "nonexistent" in term.message


def test_exec_probe_and_runner_shutdown_leaves_no_processes(core, namespace, make_runner, h, tmp_path):
    runner = make_runner([namespace])
    flag = tmp_path / "ready-flag"
    child_file = tmp_path / "child.pid"
    # The container forks a child (a second process in its group) that must die with it.
    # The second child leaves the process group (a new session, as an engine launcher may do).
    script = (
        "import subprocess, time; c = subprocess.Popen(['sleep', '300'])\n"
        "d = subprocess.Popen(['sleep', '301'], start_new_session=True)\n"
        f"open({str(child_file)!r}, 'w').write(f'{{c.pid}} {{d.pid}}'); time.sleep(300)"
    )
    pod = h.command_pod("worker", ["python", "-c", script])
    pod["spec"]["containers"][0]["readinessProbe"] = {"exec": {"command": ["test", "-f", str(flag)]}}
    core.create_namespaced_pod(namespace, pod)

    h.wait_for(lambda: read(core, namespace, "worker").status.phase == "Running")
    child, escaped = map(int, h.wait_for(lambda: child_file.exists() and child_file.read_text()).split())
    time.sleep(0.6)
    assert h.conditions(read(core, namespace, "worker"))["Ready"] == "False"
    flag.write_text("")
    h.wait_for(lambda: h.conditions(read(core, namespace, "worker")).get("Ready") == "True", what="exec probe ok")

    pids = list(runner.container_pids(namespace, "worker").values())
    assert pids and all(h.alive(p) for p in pids) and h.alive(child) and h.alive(escaped)
    runner.stop()
    assert not any(h.alive(p) for p in [*pids, child, escaped]), "runner shutdown must leave no processes"


def test_cli_runs_pods_and_cleans_up_on_sigterm(core, namespace, control_plane, h, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    logdir = tmp_path / "cli-logs"
    cmd = [sys.executable, "-m", "seedfork_localdev.podrunner", "--kubeconfig", str(control_plane.kubeconfig)]
    cmd += ["--namespace", namespace, "--node", f"{namespace}-cli:pool=cli", "--logdir", str(logdir)]
    cmd += ["--probe-period", "0.2", "--max-grace", "1"]
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        core.create_namespaced_pod(namespace, h.server_pod("clipod"))
        pod = h.wait_for(
            lambda: (p := read(core, namespace, "clipod")) and h.conditions(p).get("Ready") == "True" and p
        )
        assert pod.spec.node_name == f"{namespace}-cli"
        assert core.read_node(f"{namespace}-cli").metadata.labels["pool"] == "cli"
        pid = int(pod.status.container_statuses[0].container_id.rpartition("/")[2])
        assert h.get_json(pod.status.pod_ip)["pid"] == pid
        assert (logdir / f"{namespace}_clipod_server.log").read_text().startswith("serving on")
    finally:
        os.kill(cli.pid, signal.SIGTERM)
        out, _ = cli.communicate(timeout=30)
    assert cli.returncode == 0, out.decode()
    assert not h.alive(pid), "the CLI must kill its pods' processes when it stops"


def test_only_the_given_namespaces_are_run(core, namespace, make_runner, h):
    import uuid

    second, other = (f"{namespace}-{uuid.uuid4().hex[:4]}" for _ in range(2))
    for name in (second, other):
        core.create_namespace({"metadata": {"name": name}})
    runner = make_runner([namespace, second])
    for ns in (namespace, second, other):
        core.create_namespaced_pod(ns, h.server_pod("p", probe=False))
    h.wait_for(lambda: read(core, namespace, "p").status.phase == "Running")
    h.wait_for(lambda: read(core, second, "p").status.phase == "Running")
    assert runner.pod_ip(namespace, "p") != runner.pod_ip(second, "p")
    time.sleep(0.3)
    untouched = read(core, other, "p")
    assert untouched.spec.node_name is None and untouched.status.phase == "Pending"
    core.delete_namespaced_pod("p", other)  # unbound: the API server removes it at once


def test_admin_credentials_mode_gives_pods_the_runner_kubeconfig(core, namespace, make_runner, h, control_plane):
    make_runner([namespace], pod_credentials="admin")
    core.create_namespaced_pod(namespace, h.server_pod("adm", probe=False))
    pod = h.wait_for(lambda: (p := read(core, namespace, "adm")).status.phase == "Running" and p)
    served = h.wait_for(lambda: _try_get(h, pod.status.pod_ip))
    assert served["env"]["KUBECONFIG"] == str(control_plane.kubeconfig)
