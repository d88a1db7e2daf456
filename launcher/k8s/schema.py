"""The KubeRay v1.7.0 CRD schemas as the apiserver applies them: defaults, null pruning, unknown
fields rejected, list-map keys unique (launcher/k8s/validate.py adds the CEL and operator rules).
One problem per line: the field path, the bad value, and the fix.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any, Iterable

from launcher.errors import MissingExtraError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SCHEMAS = {"RayJob": "rayjob.v1.openapi.json", "RayCluster": "raycluster.v1.openapi.json"}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def prune_nulls(node: Any) -> Any:
    """The apiserver drops null fields (none in the v1 specs is nullable) before defaulting."""
    if isinstance(node, dict):
        return {k: prune_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [prune_nulls(v) for v in node]
    return node


def apply_defaults(node: Any, schema: dict) -> None:
    """Fill `default`s into objects that are present, as the apiserver does, in place."""
    if isinstance(node, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in node and "default" in sub:
                node[name] = copy.deepcopy(sub["default"])
            if name in node:
                apply_defaults(node[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for value in node.values():
                apply_defaults(value, extra)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for item in node:
            apply_defaults(item, schema["items"])


def list_key_problems(node: Any, schema: dict, path: str = "(document)") -> list[str]:
    """Lists the schema marks `x-kubernetes-list-type: map` (items unique by their
    `x-kubernetes-list-map-keys`, each key present) or `set` (items unique), wherever they are:
    the apiserver rejects a repeat that a plain JSON Schema check lets through (two containers
    named alike, an env var given twice, two volumes mounted at one path)."""
    problems = []
    if isinstance(node, dict):
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            sub = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if isinstance(sub, dict):
                problems += list_key_problems(value, sub, _join(path, key))
    elif isinstance(node, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        kind, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys") or []
        seen: dict = {}
        for i, item in enumerate(node):
            where = f"{path}[{i}]"
            if kind == "map" and isinstance(item, dict):
                missing = [k for k in keys if k not in item]
                if missing:
                    problems.append(f"{where}: no {', '.join(missing)}; every item of {path} needs "
                                    f"{' and '.join(keys)} (its key)")
                    continue
                identity = tuple(json.dumps(item[k], sort_keys=True) for k in keys)
                said = ", ".join(f"{k}={_short(item[k])}" for k in keys)
            elif kind == "set":
                identity, said = json.dumps(item, sort_keys=True), _short(item)
            else:
                identity = None
            if identity is not None:
                if identity in seen:
                    problems.append(f"{where}: {said} repeats {path}[{seen[identity]}]; items of {path} "
                                    f"must be unique by {' and '.join(keys) or 'value'}: remove or rename one")
                    continue
                seen[identity] = i
            problems += list_key_problems(item, items, where)
    return problems


# ---------------------------------------------------------------------------------------------
# The schema, as a structural JSON Schema


@functools.lru_cache(maxsize=None)
def _raw_schema(kind: str) -> dict:
    return json.loads((SCHEMA_DIR / SCHEMAS[kind]).read_text())


def _structural(node: Any) -> Any:
    """Copy of an OpenAPI schema where every object with `properties` forbids other keys."""
    if isinstance(node, dict):
        out = {
            k: _structural(v) for k, v in node.items()
            if not k.startswith("x-kubernetes") and k not in ("nullable", "properties")
        }
        if "properties" in node:
            # Property names are not keywords: recurse into each property's schema only.
            out["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_structural(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def _validator(kind: str):
    try:
        import jsonschema
    except ImportError:
        raise MissingExtraError("jsonschema", "k8s") from None
    checker = jsonschema.FormatChecker(formats=())
    for fmt, (low, high) in INT_RANGES.items():
        checker.checks(fmt)(lambda v, low=low, high=high: not isinstance(v, int) or low <= v <= high)
    schema = _structural(_raw_schema(kind))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by hand below
    return jsonschema.Draft7Validator(schema, format_checker=checker)


def _schema_problems(doc: dict, kind: str) -> list[str]:
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    problems = []
    for err in errors:
        problems += _describe(err)
    return problems


def _describe(err) -> list[str]:
    path = _path(err.absolute_path)
    value, schema, check = err.instance, err.schema, err.validator
    if check == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(known)):
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            more = ", ..." if len(known) > 12 else ""
            fix = f"did you mean '{hint[0]}'?" if hint else f"remove it (known: {', '.join(known[:12])}{more})"
            out.append(f"{_join(path, key)}: unknown field; {fix}")
        return out
    if check == "required":
        missing = err.validator_value
        return [f"{_join(path, m)}: required field is missing; add it" for m in missing if m not in value]
    if check == "type":
        return [f"{path}: {_short(value)} is not of type {schema['type']}; write a {schema['type']}"]
    if check == "enum":
        return [f"{path}: {_short(value)} is not allowed; use one of: {', '.join(map(str, schema['enum']))}"]
    if check == "anyOf" and any(s.get("type") == "integer" for s in schema.get("anyOf", [])):
        return [f"{path}: {_short(value)} must be an integer or a string (e.g. 8080 or 'http')"]
    if check == "pattern":
        return [f"{path}: {_short(value)} does not match {schema['pattern']}; "
                "write a Kubernetes quantity such as '2', '500m' or '8Gi'"]
    if check == "format":
        return [f"{path}: {_short(value)} is out of the {schema['format']} range; use a smaller number"]
    return [f"{path}: {_short(value)}: {err.message}; fix the value"]


# ---------------------------------------------------------------------------------------------
# Rules the schema does not express: CEL and the operator's validation.go




def _path(parts: Iterable) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _join(path: str, key: str) -> str:
    return key if path == "(document)" else f"{path}.{key}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
