"""The chart's optional ServiceMonitor against prometheus-operator's real ServiceMonitor CRD.

The CRD file comes from a pinned prometheus-operator release (Go module proxy, cached); the real
local kube-apiserver enforces its structural schema, and kubeconform checks a schema derived from it.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from seedfork_localdev import upstream

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

GROUP, VERSION, PLURAL = "monitoring.coreos.com", "v1", "servicemonitors"
ENABLED = ("--set", "metrics.serviceMonitor.enabled=true")
CUSTOM = (
    *ENABLED,
    "--set", "metrics.serviceMonitor.interval=15s",
    "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
)  # fmt: skip


@pytest.fixture(scope="module")
def servicemonitor_crd_doc() -> dict:
    docs = [d for d in yaml.safe_load_all(upstream.ensure("servicemonitor-crd").read_text()) if d]
    assert len(docs) == 1 and docs[0]["spec"]["names"]["kind"] == "ServiceMonitor"
    return docs[0]


@pytest.fixture(scope="module")
def servicemonitor_crd(api_client, servicemonitor_crd_doc):
    """The ServiceMonitor CRD installed and Established; deleted (and gone) afterwards."""
    ext = client.ApiextensionsV1Api(api_client)
    name = servicemonitor_crd_doc["metadata"]["name"]
    ext.create_custom_resource_definition(servicemonitor_crd_doc)
    try:
        deadline = time.monotonic() + 30
        while True:
            conditions = {c.type: c.status for c in ext.read_custom_resource_definition(name).status.conditions or []}
            if conditions.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established: {conditions}"
            time.sleep(0.2)
        time.sleep(0.5)  # discovery settles slightly after Established
        yield servicemonitor_crd_doc
    finally:
        ext.delete_custom_resource_definition(name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ext.read_custom_resource_definition(name)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            time.sleep(0.2)
        else:
            raise TimeoutError(f"CRD {name} still present after delete")


def _rendered(tools, helm_bin, namespace: str, *args: str) -> tuple[dict, dict]:
    docs = tools.helm_template(helm_bin, *args, namespace=namespace)
    (monitor,) = tools.by_kind(docs, "ServiceMonitor")
    (service,) = tools.by_kind(docs, "Service")
    return monitor, service


def _create(api_client, namespace: str, body: dict, dry_run: str | None = "All"):
    kw = {"dry_run": dry_run} if dry_run else {}
    return client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict", **kw
    )


def _rejection(api_client, namespace: str, body: dict) -> tuple[int, str]:
    """The HTTP status and Status message of a create the apiserver refuses."""
    with pytest.raises(ApiException) as info:
        _create(api_client, namespace, body)
    return info.value.status, json.loads(info.value.body)["message"]


def test_no_servicemonitor_unless_enabled(tools, helm_bin):
    assert not tools.by_kind(tools.helm_template(helm_bin), "ServiceMonitor")
    args = (*ENABLED, "--set", "metrics.service.enabled=false")
    assert not tools.by_kind(tools.helm_template(helm_bin, *args), "ServiceMonitor")


@pytest.mark.parametrize("args", [ENABLED, CUSTOM], ids=["defaults", "custom-label-and-interval"])
def test_rendered_servicemonitor_is_accepted_by_the_real_crd(
    tools, helm_bin, api_client, servicemonitor_crd, namespace, args
):
    monitor, service = _rendered(tools, helm_bin, namespace, *args)
    if args == CUSTOM:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    _create(api_client, namespace, monitor)  # server-side dry run, strict field validation
    # Created for real: the stored spec equals the rendered one, so nothing was pruned or defaulted away.
    stored = _create(api_client, namespace, monitor, dry_run=None)
    assert stored["spec"] == monitor["spec"]

    # It selects the chart's metrics Service (label selection done by the apiserver) by a port it has.
    client.CoreV1Api(api_client).create_namespaced_service(namespace, service)
    selector = ",".join(f"{k}={v}" for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    selected = client.CoreV1Api(api_client).list_namespaced_service(namespace, label_selector=selector).items
    assert [s.metadata.name for s in selected] == [service["metadata"]["name"]]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    ports = {p.name for p in selected[0].spec.ports}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_the_crd_check_rejects_broken_servicemonitors(tools, helm_bin, api_client, servicemonitor_crd, namespace):
    """Negative control: the same path fails a value breaking the CRD's pattern and an unknown field."""
    monitor, _ = _rendered(tools, helm_bin, namespace, *ENABLED)

    bad_interval = copy.deepcopy(monitor)
    bad_interval["spec"]["endpoints"][0]["interval"] = "thirty seconds"
    status, message = _rejection(api_client, namespace, bad_interval)
    assert status == 422, message
    assert "spec.endpoints[0].interval" in message and "should match" in message

    unknown = copy.deepcopy(monitor)
    unknown["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # a Prometheus config name, not a CRD field
    status, message = _rejection(api_client, namespace, unknown)
    assert status == 400, message
    assert 'strict decoding error: unknown field "spec.endpoints[0].scrapeInterval"' in message


def test_rendered_servicemonitor_passes_kubeconform_strict(
    tools, helm_bin, kubeconform_bin, schema_dir, servicemonitor_crd_doc, tmp_path
):
    """The same CRD as a strict kubeconform schema; the rest of the chart uses the usual schemas."""
    written = tools.write_crd_schemas(servicemonitor_crd_doc, tmp_path)
    assert [p.name for p in written] == [tools.schema_file_name("ServiceMonitor", f"{GROUP}/{VERSION}")]
    extra = ("-schema-location", str(tmp_path) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json")
    rendered = tools.run(
        [helm_bin, "template", "sf", tools.CHART, "--kube-version", tools.KUBE_VERSION, *CUSTOM]
    ).stdout
    assert "kind: ServiceMonitor" in rendered
    proc = tools.kubeconform(kubeconform_bin, schema_dir, rendered, *extra)
    summary = json.loads(proc.stdout)["summary"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0

    for bad, where in (
        (rendered.replace("interval: 15s", "interval: thirty seconds"), "/spec/endpoints/0/interval"),
        (rendered.replace("path: /metrics", "path: /metrics\n      scrapeInterval: 30s"), "/spec/endpoints/0'"),
    ):
        assert bad != rendered
        proc = tools.kubeconform(kubeconform_bin, schema_dir, bad, *extra)
        assert proc.returncode != 0
        out = json.loads(proc.stdout)
        assert out["summary"]["invalid"] == 1, proc.stdout
        (invalid,) = [r for r in out["resources"] if r["status"] == "statusInvalid"]
        assert invalid["kind"] == "ServiceMonitor" and where in invalid["msg"], invalid


def test_values_schema_checks_the_interval_as_the_crd_does(tools, servicemonitor_crd_doc):
    """A bad interval fails at `helm install` with the CRD's own pattern, not later in the cluster."""
    crd_spec = servicemonitor_crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd_pattern = crd_spec["properties"]["endpoints"]["items"]["properties"]["interval"]["pattern"]
    values = json.loads((tools.CHART / "values.schema.json").read_text())
    assert values["properties"]["metrics"]["properties"]["serviceMonitor"]["properties"]["interval"]["pattern"] == (
        crd_pattern
    )
