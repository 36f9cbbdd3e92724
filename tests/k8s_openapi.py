"""JSON schemas of Kubernetes core objects, built from the installed `kubernetes` Python client's models (which
the client generates from the Kubernetes OpenAPI spec of its release): each model's `openapi_types` (the type of
every field), `attribute_map` (its JSON name) and its required fields (pydantic's, or those its setters refuse
to leave None).
Unknown fields are rejected, as `kubectl apply --validate=strict` does. Quantities (resources, sizeLimit,
storage) take an integer or a quantity string, as the API server does. Nothing is downloaded.

    python tests/k8s_openapi.py strip-crd CRD.yaml > tests/schemas/ray.io_rayjobs.v1.json
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict

SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAYJOB_SCHEMA = SCHEMAS / "ray.io_rayjobs.v1.json"
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern":
            r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
                   ("V1VolumeResourceRequirements", "limits"), ("V1VolumeResourceRequirements", "requests"),
                   ("V1EmptyDirVolumeSource", "size_limit")}
KINDS = {"PodTemplateSpec": "V1PodTemplateSpec", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
         "ConfigMap": "V1ConfigMap", "ServiceAccount": "V1ServiceAccount", "Role": "V1Role",
         "RoleBinding": "V1RoleBinding"}


def _required(cls) -> set:
    """Python names of the fields the model requires: pydantic's (kubernetes >= 35), else its setters' checks."""
    fields = getattr(cls, "model_fields", None)
    if fields:
        return {name for name, info in fields.items() if info.is_required()}
    source = inspect.getsource(cls)
    return set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", source))


def _type(text: str, definitions: Dict[str, dict], owner: str = "", field: str = "") -> dict:
    from kubernetes import client

    text = text.strip()
    if (owner, field) in QUANTITY_FIELDS:
        return QUANTITY if not text.lower().startswith("dict") else {"type": "object", "additionalProperties": QUANTITY}
    match = re.fullmatch(r"(?:list\[|List\[)(.+)\]", text)
    if match:
        return {"type": "array", "items": _type(match.group(1), definitions)}
    match = re.fullmatch(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]", text)
    if match:
        return {"type": "object", "additionalProperties": _type(match.group(2) or match.group(4), definitions)}
    simple = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
              "bool": {"type": "boolean"}, "datetime": {"type": "string"}, "date": {"type": "string"},
              "bytes": {"type": "string", "contentEncoding": "base64"},
              "object": {}}
    if text in simple:
        return simple[text]
    cls = getattr(client, text)
    if text not in definitions:
        definitions[text] = {}  # placeholder: recursive models
        required = _required(cls)
        definitions[text] = {
            "type": "object", "additionalProperties": False,
            "properties": {cls.attribute_map[attr]: _type(kind, definitions, text, attr)
                           for attr, kind in cls.openapi_types.items()},
            "required": sorted(cls.attribute_map[attr] for attr in required),
        }
    return {"$ref": f"#/definitions/{text}"}


@lru_cache(maxsize=None)
def schema(model: str) -> str:
    """The JSON schema (as JSON text, for the cache) of a kubernetes.client model, e.g. V1PodTemplateSpec."""
    definitions: Dict[str, dict] = {}
    root = _type(model, definitions)
    return json.dumps({**root, "definitions": definitions})


def validator(kind_or_model: str):
    import jsonschema

    return jsonschema.Draft7Validator(json.loads(schema(KINDS.get(kind_or_model, kind_or_model))))


def errors(obj: dict, kind_or_model: str) -> list:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(kind_or_model).iter_errors(obj)]


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


if __name__ == "__main__" and sys.argv[1:2] == ["strip-crd"]:
    import yaml

    crd = yaml.safe_load(Path(sys.argv[2]).read_text(encoding="utf-8"))
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    sys.stdout.write(json.dumps(strip_descriptions(v1), indent=0, sort_keys=True) + "\n")
