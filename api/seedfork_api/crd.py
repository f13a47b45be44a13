"""Generate the ModelReplicaSet CustomResourceDefinition from the pydantic models.

``python -m seedfork_api.crd`` rewrites ``crds/seedfork.io_modelreplicasets.yaml``;
a test fails when the committed file and the models disagree.

Pydantic's JSON schema is close to an OpenAPI v3 structural schema; the
differences handled here: ``$ref`` is inlined, ``Optional`` becomes an omitted
field, ``additionalProperties: false`` is dropped (the apiserver prunes unknown
fields instead), free-form objects get ``x-kubernetes-preserve-unknown-fields``,
and fields built by a default factory get that value as their default, so an
absent ``transfer`` is filled in by the apiserver, except the policy fields a
cluster admin may default (``TransferSpec.CLUSTER_DEFAULTED``): those stay unset
and the operator resolves them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import spec as api

# CEL rules and list semantics that JSON schema has no words for, keyed by model.
_EXTRA: dict[type[BaseModel], dict[str, Any]] = {
    api.ModelReplicaSetSpec: {"x-kubernetes-validations": api.SPEC_RULES},
    api.PortRange: {"x-kubernetes-validations": api.PORT_RANGE_RULES},
    api.ModelIdentity: {"x-kubernetes-validations": api.MODEL_RULES},
    api.EngineSpec: {"x-kubernetes-validations": api.ENGINE_RULES},
    api.TransferSpec: {"x-kubernetes-validations": api.TRANSFER_RULES},
}
_CONDITIONS = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"], "maxItems": 16}
_DROP = {"title", "additionalProperties", "$defs"}


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from root, by the name pydantic uses in $defs."""
    found: dict[str, type[BaseModel]] = {}

    def visit(model: type[BaseModel]) -> None:
        found[model.__name__] = model
        for field in model.model_fields.values():
            for arg in _type_args(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ not in found:
                    visit(arg)

    visit(root)
    return found


def _type_args(annotation: Any) -> list[Any]:
    args = list(getattr(annotation, "__args__", ()) or ())
    return [annotation, *[a for arg in args for a in _type_args(arg)]]


def _structural(schema: dict[str, Any], defs: dict[str, Any], models: dict[str, type[BaseModel]]) -> dict:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        return _structural(merged, defs, models)
    if "anyOf" in schema:  # Optional[X]: the field is simply not required.
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
        return _structural({**options[0], **rest}, defs, models)

    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs, models) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs, models)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    model = models.get(schema.get("title", ""))
    if model is not None and "properties" in out:
        _add_model_details(model, out)
    return out


def _add_model_details(model: type[BaseModel], out: dict[str, Any]) -> None:
    cluster_defaulted = getattr(model, "CLUSTER_DEFAULTED", ())
    for name, field in model.model_fields.items():
        prop = out["properties"].get(field.alias or name)
        if prop is None:
            continue
        if name in getattr(model, "ADMISSION_REQUIRED", ()):  # the apiserver must not invent this value
            prop.pop("default", None)
            out["required"] = [field.alias or name, *out.get("required", [])]
            continue
        if name in cluster_defaulted:  # left unset at admission: the operator resolves it (spec.resolve_transfer)
            builtin = field.get_default(call_default_factory=True)
            prop.pop("default", None)
            unset = "the operator's transferDefaults, else " + ("none" if builtin is None else json.dumps(builtin))
            prop["description"] = f"{prop.get('description', '').rstrip()} Unset: {unset}.".lstrip()
            continue
        if field.default_factory is not None and "default" not in prop:
            value = field.default_factory()
            # The full value, not {}: CEL rules are checked against the default itself.
            prop["default"] = _admission_default(value)
    out.update(_EXTRA.get(model, {}))


def _admission_default(value: Any) -> Any:
    if not isinstance(value, api.ApiModel):
        return value
    return value.model_dump(
        by_alias=True, exclude_none=True, mode="json", exclude=set(getattr(value, "CLUSTER_DEFAULTED", ()))
    )


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), _models(model))


def status_schema() -> dict[str, Any]:
    schema = _schema_of(api.ModelReplicaSetStatus)
    conditions = schema["properties"]["conditions"]
    conditions.update(_CONDITIONS)
    item = conditions["items"]
    item["properties"]["lastTransitionTime"]["format"] = "date-time"
    item["properties"]["type"]["maxLength"] = 316
    item["properties"]["reason"]["maxLength"] = 1024
    item["properties"]["message"]["maxLength"] = 32768
    return schema


def spec_schema() -> dict[str, Any]:
    return _schema_of(api.ModelReplicaSetSpec)


def crd() -> dict[str, Any]:
    spec = spec_schema()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["seedfork"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Seeds", "type": "integer", "jsonPath": ".status.seeds"},
                        {"name": "Standby", "type": "integer", "jsonPath": ".status.standbyWarm"},
                        {"name": "Backend", "type": "string", "jsonPath": ".status.backend"},
                        {"name": "Queued", "type": "integer", "jsonPath": ".status.transfers.queued"},
                        {"name": "Engine", "type": "string", "jsonPath": ".spec.engine.kind", "priority": 1},
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-validations": api.ROOT_RULES,
                            "description": "A set of inference replicas of one model that scale out "
                            "by pulling verified weights from replicas already serving.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated from seedfork_api.spec by `python -m seedfork_api.crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else Path("crds/seedfork.io_modelreplicasets.yaml")
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
