"""The README's reference part is generated: the CRD field table from the CRD's schema, the metrics list
from the operator's and the agent's Prometheus collectors. The test fails when it is stale;
``python tests/chart/test_readme.py`` rewrites it."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CRD = REPO / "crds" / "seedfork.io_modelreplicasets.yaml"
BEGIN = "<!-- BEGIN GENERATED REFERENCE (python tests/chart/test_readme.py) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _type(schema: dict) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"[]{_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    return kind


def _bounds(schema: dict) -> str:
    parts = []
    for key, word in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "len ≥"), ("maxLength", "len ≤")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    default = schema.get("default")
    if isinstance(default, list) and default:
        parts.append(f"default `{', '.join(map(str, default))}`")
    elif default not in (None, "", []) and not isinstance(default, dict):
        parts.append(f"default `{default}`")
    return ", ".join(parts)


def _rows(schema: dict, path: str, required: set[str], rows: list[str], rules: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        rules.append(f"- `{path or '.'}`: {rule['message']}")
    for name, sub in (schema.get("properties") or {}).items():
        field = f"{path}.{name}" if path else name
        doc = " ".join((sub.get("description") or "").split()).replace("|", "\\|")
        req = " (required)" if name in required else ""
        extra = _bounds(sub)
        text = " ".join(p for p in (doc, f"({extra})" if extra else "") if p)
        rows.append(f"| `{field}`{req} | {_type(sub)} | {text} |")
        if sub.get("type") == "object":
            _rows(sub, field, set(sub.get("required", [])), rows, rules)
        elif sub.get("type") == "array" and sub.get("items", {}).get("type") == "object":
            _rows(sub["items"], field + "[]", set(sub["items"].get("required", [])), rows, rules)


def crd_reference() -> str:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    names = crd["spec"]["names"]
    out = [
        f"### CRD reference: {names['kind']} ({crd['spec']['group']}/{version['name']})",
        "",
        f"Short name `{names['shortNames'][0]}`; subresources: status, scale (`.spec.replicas`, "
        "`.status.replicas`, selector `.status.selector`).",
    ]
    root_rules = [f"- {rule['message']}" for rule in root.get("x-kubernetes-validations", [])]
    if root_rules:
        out += ["", "Rules checked at admission (CEL) on the whole object:", "", *root_rules]
    for part in ("spec", "status"):
        rows: list[str] = []
        rules: list[str] = []
        sub = root["properties"][part]
        _rows(sub, part, set(sub.get("required", [])), rows, rules)
        out += ["", f"#### {part}", "", "| field | type | description |", "|---|---|---|", *rows]
        if rules:
            out += ["", f"Rules checked at admission (CEL) on `{part}`:", "", *rules]
    return "\n".join(out)


def _metric_rows(collectors) -> list[str]:
    from prometheus_client.metrics import MetricWrapperBase

    rows = []
    for metric in collectors:
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")
        labels = ", ".join(metric._labelnames) or "—"
        rows.append(f"| `{name}` | {metric._type} | {labels} | {metric._documentation} |")
    return sorted(rows)


def metrics_reference() -> str:
    from seedfork_agent.server import Metrics
    from seedfork_operator import metrics as operator_metrics

    head = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    return "\n".join(
        [
            "### Metrics",
            "",
            "Operator (`/metrics` on `--metrics-port`, the chart's metrics Service):",
            "",
            *head,
            *_metric_rows(vars(operator_metrics).values()),
            "",
            "Agent (`/metrics` on the agent port of every engine pod):",
            "",
            *head,
            *_metric_rows(vars(Metrics()).values()),
        ]
    )


def generated() -> str:
    return "\n".join([BEGIN, "## Reference", "", crd_reference(), "", metrics_reference(), END])


def _current() -> str | None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def test_readme_reference_is_generated_from_the_crd_and_the_collectors():
    current = _current()
    assert current is not None, "README has no generated reference: run python tests/chart/test_readme.py"
    assert current == generated(), "README reference is stale: run python tests/chart/test_readme.py"
    # It says something real: every spec.transfer field and every operator metric is listed.
    assert "| `spec.transfer.maxClientsPerSeed` | integer |" in current
    assert "`seedfork_pod_ready_seconds` | histogram" in current


def test_readme_documents_installing_with_helm():
    text = README.read_text()
    assert "## Install with Helm" in text
    assert "helm install seedfork charts/seedfork" in text


def write() -> None:
    text = README.read_text()
    current = _current()
    text = text.replace(current, generated()) if current else text.rstrip("\n") + "\n\n" + generated() + "\n"
    README.write_text(text)


if __name__ == "__main__":
    write()
    sys.exit(0)
