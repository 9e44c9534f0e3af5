"""Templates and the document schema: strict, core types only, and in step with each other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import jsonschema
import pytest

import schemas
from ingest.outcome import DuplicateReason, ReceiptStatus
from ingest.sinks.base import Receipt

CORE_TYPES = {"text", "keyword", "date", "long", "integer", "boolean", "flattened", "object",
              "nested"}


def mapping_fields(properties: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict]]:
    for name, spec in properties.items():
        path = f"{prefix}{name}"
        yield path, spec
        if "properties" in spec:
            yield from mapping_fields(spec["properties"], path + ".")


def mapping_leaves(properties: dict[str, Any], prefix: str = "") -> set[str]:
    return {path for path, spec in mapping_fields(properties, prefix) if "properties" not in spec}


def schema_leaves(node: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    """Leaf paths of the document JSON Schema, arrays of objects looked through."""
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        return schema_leaves(node["items"], defs, prefix)
    props = node.get("properties")
    if not props or prefix == "popvault.headers":
        return {prefix.rstrip(".")}
    out: set[str] = set()
    for name, sub in props.items():
        out |= schema_leaves(sub, defs, f"{prefix}{name}" if not prefix else f"{prefix}.{name}")
    return out


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return schemas.index_template("pvt")


def test_files_are_valid_json() -> None:
    for name in ("index_template.json", "receipts_template.json", "document.schema.json"):
        json.loads(resources.files("schemas").joinpath(name).read_text(encoding="utf-8"))


def test_prefix_is_substituted(template: dict[str, Any]) -> None:
    assert template["index_patterns"] == ["pvt-messages-*"]
    assert schemas.receipts_template("pvt")["index_patterns"] == ["pvt-receipts", "pvt-receipts-*"]
    assert "{prefix}" not in json.dumps(template)
    assert "{prefix}" in json.dumps(schemas.load_json("index_template.json"))


@pytest.mark.parametrize("prefix", ["", "Upper", "-dash", "_under", "a b", "a*b", "x" * 200])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        schemas.index_template(prefix)


def test_loader_returns_copies() -> None:
    schemas.index_template("one")["template"]["settings"]["number_of_replicas"] = 5
    assert schemas.index_template("two")["template"]["settings"]["number_of_replicas"] == 0


@pytest.mark.parametrize("which", ["messages", "receipts"])
def test_mappings_are_strict_with_core_types(which: str) -> None:
    body = schemas.index_template("p") if which == "messages" else schemas.receipts_template("p")
    settings = body["template"]["settings"]
    assert settings["number_of_shards"] == 1 and settings["number_of_replicas"] == 0
    mappings = body["template"]["mappings"]
    assert mappings["dynamic"] == "strict"
    normalizers = settings.get("analysis", {}).get("normalizer", {})
    for path, spec in mapping_fields(mappings["properties"]):
        kind = spec.get("type", "object")
        assert kind in CORE_TYPES, path
        if kind in ("object", "nested"):
            assert spec.get("dynamic") == "strict", path
        if kind == "keyword":
            assert "ignore_above" in spec, path
        if "normalizer" in spec:
            assert spec["normalizer"] in normalizers, path
        for sub_name, sub in spec.get("fields", {}).items():
            assert sub["type"] in CORE_TYPES and "ignore_above" in sub, f"{path}.{sub_name}"


def test_message_mapping_specifics(template: dict[str, Any]) -> None:
    props = template["template"]["mappings"]["properties"]
    headers = props["popvault"]["properties"]["headers"]
    assert headers == {"type": "flattened", "ignore_above": 8191}
    assert props["popvault"]["properties"]["accounts"]["type"] == "keyword"
    address = props["email"]["properties"]["from"]["properties"]["address"]
    assert address["type"] == "keyword" and address["normalizer"] == "popvault_lowercase"
    subject = props["email"]["properties"]["subject"]
    assert subject["type"] == "text" and subject["fields"]["keyword"]["ignore_above"] == 1024
    assert props["@timestamp"]["type"] == "date"
    assert props["popvault"]["properties"]["body_text"]["type"] == "text"


def test_schema_and_mapping_describe_the_same_fields(template: dict[str, Any]) -> None:
    schema = schemas.document_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    in_schema = schema_leaves(schema, schema["$defs"])
    in_mapping = mapping_leaves(template["template"]["mappings"]["properties"])
    assert in_schema == in_mapping


def test_receipt_mapping_matches_receipt() -> None:
    receipt = Receipt(
        account_id="a", uidl="u", message_key="k" * 64, raw_sha256="s" * 64, raw_size=1,
        status=ReceiptStatus.ARCHIVED, reason=DuplicateReason.NEW,
        archived_at="2026-01-01T00:00:00Z",
    )
    props = schemas.receipts_template("p")["template"]["mappings"]["properties"]
    assert set(props) == set(receipt.to_dict())
    assert props["archived_at"]["type"] == props["deleted_at"]["type"] == "date"
