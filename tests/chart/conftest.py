"""Helpers for the chart, Dockerfile and example tests: helm, kubeconform, schemas, ServiceAccount clients.

helm and kubeconform are the real Go tools (built once from the Go module proxy).
kubeconform cannot download schemas here, so the JSON schemas it checks against are
made locally: built-in kinds from the running kube-apiserver's own /openapi/v2, the
ModelReplicaSet from the CRD file, and a KEDA ScaledObject schema kept in schemas/.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from seedfork_localdev.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "seedfork"
EXAMPLES = REPO / "examples"
LOCAL_SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBE_VERSION = "1.36.3"


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    from seedfork_localdev import binaries

    return binaries.ensure("helm")


@pytest.fixture(scope="session")
def kubeconform_bin() -> Path:
    from seedfork_localdev import binaries

    return binaries.ensure("kubeconform")


def run(cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def helm_template(helm: Path, *args: str, namespace: str = "seedfork-system", check: bool = True):
    """Render the chart; returns the parsed documents (or the process when check is False)."""
    cmd = [helm, "template", "sf", CHART, "--namespace", namespace, "--kube-version", KUBE_VERSION, *args]
    proc = run(cmd, check=check)
    if not check:
        return proc
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# ---- JSON schemas for kubeconform --------------------------------------------------------


def schema_file_name(kind: str, api_version: str) -> str:
    """kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}: kind, first label of the group, version."""
    group, _, version = api_version.rpartition("/")
    first = (group or version).split(".")[0]
    suffix = f"-{first}" + (f"-{version}" if group else "")
    return f"{kind.lower()}{suffix}.json"


def _strict(schema):
    """Strict schemas: objects with declared properties accept no other keys (kubeconform -strict).

    Walks schema positions only (properties, items, ...), never a map of property names, so a
    property that happens to be called ``oneOf`` or ``nullable`` is left alone.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(sub) for sub in out[key]]
    if out.get("format") == "int-or-string" or out.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and out.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        out["additionalProperties"] = False
    return out


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def write_openapi_schemas(openapi_v2: dict, out_dir: Path) -> int:
    """One standalone strict schema per built-in kind, with only the definitions it reaches."""
    defs = openapi_v2["definitions"]
    # Quantity is a string in the OpenAPI document, but YAML writes `cpu: 1` as a number.
    defs = {
        **defs,
        "io.k8s.apimachinery.pkg.api.resource.Quantity": {"oneOf": [{"type": "string"}, {"type": "number"}]},
    }
    written = 0
    for name, definition in defs.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if gvk["kind"].endswith("List") or name.startswith("io.k8s.apimachinery.pkg.apis.meta"):
                continue
            needed, todo = {name}, [name]
            while todo:
                found: set[str] = set()
                _refs(defs[todo.pop()], found)
                for ref in found - needed:
                    needed.add(ref)
                    todo.append(ref)
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            schema = {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$ref": f"#/definitions/{name}",
                "definitions": {n: _strict(defs[n]) for n in sorted(needed)},
            }
            (out_dir / schema_file_name(gvk["kind"], api_version)).write_text(json.dumps(schema))
            written += 1
    return written


def write_crd_schemas(crd: dict, out_dir: Path) -> list[Path]:
    """The CRD's openAPIV3Schema per served version, made strict, as kubeconform wants it."""
    paths = []
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}
        schema["properties"]["apiVersion"] = {"type": "string", "const": f"{group}/{version['name']}"}
        schema["properties"]["kind"] = {"type": "string", "const": kind}
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        path = out_dir / schema_file_name(kind, f"{group}/{version['name']}")
        path.write_text(json.dumps(schema))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def schema_dir(control_plane, tmp_path_factory) -> Path:
    """kubeconform schemas: this apiserver's built-in kinds, our CRDs, and the KEDA ScaledObject."""
    out = tmp_path_factory.mktemp("schemas")
    openapi = json.loads(control_plane._get("/openapi/v2"))
    assert write_openapi_schemas(openapi, out) > 50
    for crd_file in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(crd_file.read_text()):
            write_crd_schemas(crd, out)
    for path in LOCAL_SCHEMAS.glob("*.json"):
        (out / path.name).write_text(path.read_text())
    return out


def kubeconform(kubeconform_bin: Path, schema_dir: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    location = str(schema_dir) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    cmd = [kubeconform_bin, "-strict", "-summary", "-output", "json", "-schema-location", location, *extra, "-"]
    return subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=120)


# ---- clients acting as a ServiceAccount -------------------------------------------------


def token_for(api_client, namespace: str, service_account: str) -> str:
    """A real bound token from the TokenRequest API, as a pod of that account would get."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    body = {"spec": {"audiences": [], "expirationSeconds": 3600}}
    return core.create_namespaced_service_account_token(service_account, namespace, body).status.token


def client_as(control_plane, token: str):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = control_plane.url
    cfg.ssl_ca_cert = str(control_plane.ca_path)
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(cfg)


def status_of(call) -> int:
    """The HTTP status of an API call: 2xx on success, the ApiException's status otherwise."""
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as exc:
        return exc.status
    return 200


def wait_for(check, timeout: float = 15.0, what: str = "condition"):
    return wait_until(check, timeout, what, 0.2)


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """The helpers above, for test modules (pytest's importlib mode cannot import conftest)."""
    funcs = (
        run, helm_template, by_kind, kubeconform, token_for, client_as, status_of, wait_for, schema_file_name,
        write_crd_schemas,
    )  # fmt: skip
    return SimpleNamespace(
        **{f.__name__: f for f in funcs}, REPO=REPO, CHART=CHART, EXAMPLES=EXAMPLES, KUBE_VERSION=KUBE_VERSION
    )
