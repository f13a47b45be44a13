"""The chart against the real local kube-apiserver: kubeconform with its schemas, helm install, and
the operator's and agent's API calls made with the chart's own ServiceAccounts (TokenRequest tokens)."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from kubernetes import client, watch

from seedfork_api import contract
from seedfork_api import spec as api

# The first test that needs helm or kubeconform builds it once from the Go module proxy (minutes, cold).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _summary(proc) -> dict:
    return json.loads(proc.stdout)["summary"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--set", "operator.replicas=2", "--set", "networkPolicy.modelReplicaSets[0].name=llama"],
        ["--set", "rbac.clusterWide=false", "--set", "watchNamespaces={a,b}", "--set", "operator.replicas=3"],
    ],
    ids=["default", "ha-cluster-wide", "ha-namespaced"],
)
def test_rendered_chart_passes_kubeconform_strict(tools, helm_bin, kubeconform_bin, schema_dir, args):
    rendered = tools.run(
        [helm_bin, "template", "sf", tools.CHART, "--include-crds", "--kube-version", tools.KUBE_VERSION, *args]
    ).stdout
    proc = tools.kubeconform(kubeconform_bin, schema_dir, rendered)
    summary = _summary(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0
    assert summary["valid"] == rendered.count("\nkind: ") + rendered.startswith("kind: ")


def test_kubeconform_with_these_schemas_catches_mistakes(tools, helm_bin, kubeconform_bin, schema_dir):
    """Negative control: the generated schemas are strict enough to fail a typo and a wrong type."""
    rendered = tools.run([helm_bin, "template", "sf", tools.CHART, "--kube-version", tools.KUBE_VERSION]).stdout
    for bad in (
        rendered.replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true"),
        rendered.replace("replicas: 1", "replicas: one"),
    ):
        assert bad != rendered
        proc = tools.kubeconform(kubeconform_bin, schema_dir, bad)
        assert proc.returncode != 0
        assert _summary(proc)["invalid"] == 1


def _install(tools, helm_bin, control_plane, release: str, namespace: str, *args: str) -> str:
    out = tools.run(
        [
            helm_bin, "install", release, tools.CHART,
            "--kubeconfig", control_plane.kubeconfig, "--namespace", namespace, "--create-namespace", *args,
        ]
    )  # fmt: skip
    return out.stdout


def _mrs(name: str) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "model": {"name": "seedfork/tiny", "uri": "/models/tiny"},
            "engine": {"kind": "reference"},
        },
    }


def _engine_pod(name: str, set_name: str, service_account: str) -> dict:
    """A pod shaped as the operator renders one: contract labels, readiness gate, token from a Secret."""
    return {
        "metadata": {
            "name": name,
            "labels": {contract.LABEL_SET: set_name, contract.LABEL_MANAGED_BY: contract.MANAGED_BY},
        },
        "spec": {
            "serviceAccountName": service_account,
            "readinessGates": [{"conditionType": contract.READINESS_GATE}],
            "containers": [
                {
                    "name": "engine",
                    "image": "seedfork/agent:0.1.0",
                    "env": [
                        {
                            "name": contract.ENV_TOKEN,
                            "valueFrom": {"secretKeyRef": {"name": f"{set_name}-token", "key": "token"}},
                        }
                    ],
                }
            ],
        },
    }


def test_helm_install_cluster_wide_and_operator_calls_as_its_service_account(
    tools, helm_bin, control_plane, api_client, crd
):
    release, ns, work = f"sf{uuid.uuid4().hex[:6]}", f"sfsys-{uuid.uuid4().hex[:6]}", f"w-{uuid.uuid4().hex[:6]}"
    notes = _install(tools, helm_bin, control_plane, release, ns)
    assert "every namespace (ClusterRole; --all-namespaces)" in notes
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    deploy = apps.read_namespaced_deployment(f"{release}-seedfork", ns)
    assert deploy.spec.template.spec.service_account_name == f"{release}-seedfork"
    ext = client.ApiextensionsV1Api(api_client)
    assert ext.read_custom_resource_definition("kopfpeerings.kopf.dev").spec.group == "kopf.dev"
    core.create_namespace({"metadata": {"name": work}})
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, work, api.PLURAL, _mrs("llama")
    )

    op = tools.client_as(control_plane, tools.token_for(api_client, ns, f"{release}-seedfork"))
    ocore, ocustom = client.CoreV1Api(op), client.CustomObjectsApi(op)
    try:
        # What the operator does, in order, for one new replica of "llama" in a namespace it serves.
        sets = ocustom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
        assert any(s["metadata"]["name"] == "llama" for s in sets["items"])
        ext_as_op = client.ApiextensionsV1Api(op)
        assert ext_as_op.list_custom_resource_definition().items
        assert ocore.list_namespace().items
        assert tools.status_of(lambda: ocore.read_node("gpu-node-1")) == 404  # allowed; no nodes exist here
        ocore.create_namespaced_secret(
            work, {"metadata": {"name": "llama-token"}, "stringData": {contract.TOKEN_SECRET_KEY: "s3cret"}}
        )
        assert ocore.read_namespaced_secret("llama-token", work).data[contract.TOKEN_SECRET_KEY]
        pod = ocore.create_namespaced_pod(work, _engine_pod("llama-0", "llama", "seedfork-agent"))
        assignment = contract.Assignment(attempt=1, source="storage")
        ocore.patch_namespaced_pod("llama-0", work, contract.annotation_patch(assignment=assignment))
        condition = {"type": contract.READINESS_GATE, "status": "True", "reason": "WeightsVerified"}
        ocore.patch_namespaced_pod_status("llama-0", work, {"status": {"conditions": [condition]}})
        got = ocore.read_namespaced_pod("llama-0", work)
        assert {c.type: c.status for c in got.status.conditions}[contract.READINESS_GATE] == "True"
        stream = watch.Watch().stream(
            ocore.list_namespaced_pod, work, resource_version="0", timeout_seconds=2, _request_timeout=5
        )
        assert "llama-0" in {event["object"].metadata.name for event in stream}
        ocustom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, work, api.PLURAL, "llama", {"status": {"replicas": 1, "selector": "x=y"}}
        )
        ocustom.patch_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            work,
            api.PLURAL,
            "llama",
            {"metadata": {"annotations": {"kopf.zalando.org/x": "1"}}},
        )
        ocore.create_namespaced_event(
            work,
            {
                "metadata": {"generateName": "llama-"},
                "involvedObject": {"kind": "Pod", "name": "llama-0", "namespace": work, "uid": pod.metadata.uid},
                "reason": "SeedAssigned",
                "message": "storage",
                "type": "Normal",
            },
        )
        ocore.delete_namespaced_pod("llama-0", work)

        # And nothing beyond that.
        rbac = client.RbacAuthorizationV1Api(op)
        denied = {
            "delete node": lambda: ocore.delete_node("n1"),
            "list nodes": lambda: ocore.list_node(),
            "delete secret": lambda: ocore.delete_namespaced_secret("llama-token", work),
            "create clusterrole": lambda: rbac.create_cluster_role({"metadata": {"name": f"{release}-x"}, "rules": []}),
            "create configmap": lambda: ocore.create_namespaced_config_map(work, {"metadata": {"name": "x"}}),
            "delete modelreplicaset": lambda: ocustom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, work, api.PLURAL, "llama"
            ),
            "create deployment": lambda: client.AppsV1Api(op).create_namespaced_deployment(
                work, deploy.to_dict() | {"metadata": {"name": "x"}}
            ),
        }
        codes = {what: tools.status_of(call) for what, call in denied.items()}
        assert codes == dict.fromkeys(denied, 403)
    finally:
        op.close()


def test_helm_install_namespaced_confines_the_operator(tools, helm_bin, control_plane, api_client, crd):
    release, ns = f"sf{uuid.uuid4().hex[:6]}", f"sfsys-{uuid.uuid4().hex[:6]}"
    served, other = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    for name in (served, other):
        core.create_namespace({"metadata": {"name": name}})
        core.create_namespaced_secret(name, {"metadata": {"name": "keep-out"}, "stringData": {"token": "x"}})
    _install(tools, helm_bin, control_plane, release, ns, "--set", "rbac.clusterWide=false", "--set",
             f"watchNamespaces={{{served}}}", "--set", "operator.replicas=2")  # fmt: skip
    peering = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "kopf.dev", "v1", served, "kopfpeerings", f"{release}-seedfork"
    )
    assert peering["kind"] == "KopfPeering"

    op = tools.client_as(control_plane, tools.token_for(api_client, ns, f"{release}-seedfork"))
    ocore, ocustom = client.CoreV1Api(op), client.CustomObjectsApi(op)
    try:
        assert tools.status_of(lambda: ocore.read_namespaced_secret("keep-out", served)) == 200
        assert tools.status_of(lambda: ocore.list_namespaced_pod(served)) == 200
        assert tools.status_of(lambda: ocore.read_node("gpu-node-1")) == 404  # allowed, just absent
        assert (
            tools.status_of(
                lambda: ocustom.patch_namespaced_custom_object(
                    "kopf.dev", "v1", served, "kopfpeerings", f"{release}-seedfork", {"status": {"me": {"priority": 1}}}
                )
            )
            == 200
        )
        outside = {
            "read secret elsewhere": lambda: ocore.read_namespaced_secret("keep-out", other),
            "list pods elsewhere": lambda: ocore.list_namespaced_pod(other),
            "create pod elsewhere": lambda: ocore.create_namespaced_pod(other, _engine_pod("p", "s", "default")),
            "list pods cluster-wide": lambda: ocore.list_pod_for_all_namespaces(),
            "delete namespace": lambda: ocore.delete_namespace(other),
            "list sets cluster-wide": lambda: ocustom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL),
        }
        codes = {what: tools.status_of(call) for what, call in outside.items()}
        assert codes == dict.fromkeys(outside, 403)
    finally:
        op.close()


def test_agent_service_account_may_only_read_watch_and_patch_pods(tools, helm_bin, control_plane, api_client, crd):
    release, ns = f"sf{uuid.uuid4().hex[:6]}", f"sfsys-{uuid.uuid4().hex[:6]}"
    _install(tools, helm_bin, control_plane, release, ns, "--set", "rbac.clusterWide=false")
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(ns, _engine_pod("llama-0", "llama", "seedfork-agent"))
    agent = tools.client_as(control_plane, tools.token_for(api_client, ns, "seedfork-agent"))
    acore = client.CoreV1Api(agent)
    try:
        assert acore.read_namespaced_pod("llama-0", ns).metadata.labels[contract.LABEL_SET] == "llama"
        report = contract.AgentReport(attempt=1, state="verified", bytes_done=10, bytes_total=10)
        acore.patch_namespaced_pod("llama-0", ns, contract.annotation_patch(report=report))
        got = contract.AgentReport.from_annotations(core.read_namespaced_pod("llama-0", ns).metadata.annotations)
        assert got.state == "verified"
        stream = watch.Watch().stream(
            acore.list_namespaced_pod,
            ns,
            field_selector="metadata.name=llama-0",
            resource_version="0",
            timeout_seconds=2,
            _request_timeout=5,
        )
        assert [e["object"].metadata.name for e in stream] == ["llama-0"]
        denied = {
            "set its own readiness gate": lambda: acore.patch_namespaced_pod_status(
                "llama-0", ns, {"status": {"conditions": [{"type": contract.READINESS_GATE, "status": "True"}]}}
            ),
            "read the token secret": lambda: acore.read_namespaced_secret(f"{release}-x", ns),
            "create a pod": lambda: acore.create_namespaced_pod(ns, _engine_pod("evil", "llama", "default")),
            "delete a pod": lambda: acore.delete_namespaced_pod("llama-0", ns),
            "list pods": lambda: acore.list_namespaced_pod(ns),
            "read pods elsewhere": lambda: acore.list_pod_for_all_namespaces(),
        }
        codes = {what: tools.status_of(call) for what, call in denied.items()}
        assert codes == dict.fromkeys(denied, 403)
    finally:
        agent.close()


def test_rendered_objects_are_accepted_by_the_apiserver_dry_run(tools, helm_bin, api_client, crd):
    """Every templated object (including the NetworkPolicy with endPort) passes server-side validation."""
    docs = tools.helm_template(
        helm_bin, "--set", "networkPolicy.modelReplicaSets[0].name=llama", "--set", "operator.replicas=2",
        namespace="default",
    )  # fmt: skip
    dyn_kinds = {d["kind"] for d in docs}
    assert {"NetworkPolicy", "Deployment", "ClusterRole", "ServiceAccount", "ClusterKopfPeering"} <= dyn_kinds
    from kubernetes import utils

    for doc in docs:
        if doc["kind"] == "ClusterKopfPeering":
            continue  # a custom resource; created for real by the install tests
        utils.create_from_dict(api_client, doc, namespace="default", dry_run="All")
    assert yaml.safe_dump(docs)


@pytest.mark.parametrize("replicas", [1, 2], ids=["standalone", "peering"])
def test_real_operator_runs_as_the_chart_service_account(
    tools, helm_bin, control_plane, api_client, crd, tmp_path, replicas
):
    """The operator process, started with the Deployment's own command and arguments and the chart's
    ServiceAccount token, serves a ModelReplicaSet: token Secret, pods with the contract, status,
    readiness gate. With 2 replicas the chart's start-up script runs too and the process joins kopf
    peering through the chart's KopfPeering object. No kubelet runs here: this test plays the
    kubelet's part (pod IP, running) as the admin."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from seedfork_localdev.controlplane import free_port

    release, ns, work = f"sf{uuid.uuid4().hex[:6]}", f"sfsys-{uuid.uuid4().hex[:6]}", f"w-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": work}})
    _install(tools, helm_bin, control_plane, release, ns, "--set", "rbac.clusterWide=false",
             "--set", f"watchNamespaces={{{work}}}", "--set", f"operator.replicas={replicas}")  # fmt: skip
    deploy = client.AppsV1Api(api_client).read_namespaced_deployment(f"{release}-seedfork", ns)
    container = deploy.spec.template.spec.containers[0]
    metrics, health = free_port(), free_port()
    args = [
        a.replace("--metrics-port=8080", f"--metrics-port={metrics}").replace(
            "http://0.0.0.0:8081", f"http://127.0.0.1:{health}"
        )
        for a in container.args
    ]
    assert f"--namespace={work}" in args
    hostname = tmp_path / "hostname"
    hostname.write_text(f"{release}-seedfork-5d8f7-x2k9q\n")
    args = [a.replace("/etc/hostname", str(hostname)) for a in args]  # the pod's name, as the kubelet sets it
    token = tools.token_for(api_client, ns, f"{release}-seedfork")
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(control_plane.kubeconfig_dict(user="operator-sa", token=token)))
    # The image has the console scripts on PATH; here they are in the virtualenv.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env.update({e.name: e.value for e in container.env or [] if e.value is not None})
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*container.command, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        tools.wait_for(healthy, 60, "operator /healthz")
        body = _mrs("llama")
        body["spec"]["replicas"] = 2
        body["spec"]["template"] = {
            "spec": {"serviceAccountName": "seedfork-agent", "containers": [{"name": "engine", "image": "e:1"}]}
        }
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, work, api.PLURAL, body)

        def pods():
            return core.list_namespaced_pod(work, label_selector=f"{contract.LABEL_SET}=llama").items

        tools.wait_for(lambda: len(pods()) == 2, 60, "two pods created by the operator")
        assert all(p.spec.service_account_name == "seedfork-agent" for p in pods())
        status = tools.wait_for(
            lambda: (
                custom.get_namespaced_custom_object(api.GROUP, api.VERSION, work, api.PLURAL, "llama")
                .get("status", {})
                .get("replicas")
                == 2
                and custom.get_namespaced_custom_object(api.GROUP, api.VERSION, work, api.PLURAL, "llama")["status"]
            ),
            30,
            "status.replicas",
        )
        # The scale subresource's selector: the set's replicas, never its standbys.
        assert status["selector"] == f"{contract.LABEL_SET}=llama,{contract.LABEL_ROLE}!={contract.ROLE_STANDBY}"
        secret = core.read_namespaced_secret(status["tokenSecret"], work)
        assert secret.data[contract.TOKEN_SECRET_KEY]

        # The kubelet's part (admin): the first pod runs at an IP. The agent's part (its own
        # ServiceAccount): report the weights verified. The operator's part: open the gate.
        pod = pods()[0]
        name = pod.metadata.name
        core.patch_namespaced_pod_status(
            name, work, {"status": {"phase": "Running", "podIP": "127.0.0.9", "podIPs": [{"ip": "127.0.0.9"}]}}
        )
        attempt = contract.Assignment.from_annotations(pod.metadata.annotations).attempt
        agent = tools.client_as(control_plane, tools.token_for(api_client, work, "seedfork-agent"))
        try:
            report = contract.AgentReport(attempt=attempt, state="verified", serving=True, bytes_done=1, bytes_total=1)
            client.CoreV1Api(agent).patch_namespaced_pod(name, work, contract.annotation_patch(report=report))
        finally:
            agent.close()

        def gate_open() -> bool:
            conditions = core.read_namespaced_pod(name, work).status.conditions or []
            return any(c.type == contract.READINESS_GATE and c.status == "True" for c in conditions)

        tools.wait_for(gate_open, 30, "readiness gate set by the operator")
        if replicas > 1:  # it announced itself in the chart's peering object, with its derived priority
            peering = custom.get_namespaced_custom_object("kopf.dev", "v1", work, "kopfpeerings", f"{release}-seedfork")
            peers = [v for v in (peering.get("status") or {}).values() if isinstance(v, dict)]
            assert len(peers) == 1 and peers[0]["priority"] > 0, peering
        text = log.read_text()
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
