"""Kibana saved objects, checked statically against the index mapping, and the import request.

Kibana cannot run here, so the objects are checked for what Kibana needs from us: valid NDJSON
with the saved-object envelope, every reference resolving inside the file, and every field
they name existing in ``schemas/index_template.json`` (aggregatable where aggregated). The
import is checked for its request shape against a stdlib HTTP stub on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import schemas
from ingest.classify import Kind
from ingest.cli_kibana import register
from ingest.errors import EXIT_AUTH, EXIT_CONFIG, EXIT_CONNECT, EXIT_FAILED, ConfigError
from ingest.kibana import (
    ATTACHMENTS_QUERY,
    RECORDS_FIELD,
    ndjson,
    object_ids,
    saved_objects,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NDJSON_PATH = ROOT / "schemas" / "kibana" / "saved_objects.ndjson"
AGGREGATABLE = {"keyword", "date", "boolean", "long", "integer", "short", "byte", "double",
                "float"}
KINDS = {k.value for k in Kind}

README_QUERIES = [
    'email.from.address : "alice@example.com"',
    "email.subject : invoice",
    "email.attachments.file.name : *.pdf",
    "email.attachments.file.extension : pdf",
    'popvault.thread.conversation_id : "<id>"',
    "popvault.kind : human and not popvault.spam : true",
    "popvault.kind : (auto_reply or bounce)",
    ATTACHMENTS_QUERY,
]
"""The KQL the README tells users to type; each must name mapped fields only."""

_KQL_FIELD_RE = re.compile(r"(?<![\w.@\"*])(@?[A-Za-z_][\w.]*)\s*:")


# ----------------------------------------------------------------------------- mapping


def mapping_types(properties: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every field path of the mapping -> its type: objects, leaves and multi-fields."""
    out: dict[str, str] = {}
    for name, spec in properties.items():
        path = f"{prefix}{name}"
        if "properties" in spec:
            out[path] = spec.get("type", "object")
            out.update(mapping_types(spec["properties"], path + "."))
            continue
        out[path] = spec["type"]
        for sub, sub_spec in spec.get("fields", {}).items():
            out[f"{path}.{sub}"] = sub_spec["type"]
    return out


@pytest.fixture(scope="module")
def fields() -> dict[str, str]:
    return mapping_types(schemas.index_template("popvault")["template"]["mappings"]["properties"])


def kql_fields(query: str) -> set[str]:
    return set(_KQL_FIELD_RE.findall(query))


def kql_values(query: str, field_name: str) -> set[str]:
    """Bare or parenthesised values of ``field : value`` / ``field : (a or b)``."""
    match = re.search(re.escape(field_name) + r"\s*:\s*(\([^)]*\)|\S+)", query)
    if not match:
        return set()
    return {v for v in re.split(r"[\s()]+", match.group(1)) if v and v not in ("or", "and")}


# ----------------------------------------------------------------------------- objects


@pytest.fixture(scope="module")
def lines() -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(NDJSON_PATH.read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line)
        assert isinstance(obj, dict), f"line {number} is not an object"
        out.append(obj)
    return out


def test_committed_file_equals_generated() -> None:
    """Regenerate with: python -c 'from ingest.kibana import ndjson; print(ndjson(), end="")'
    > schemas/kibana/saved_objects.ndjson"""
    assert NDJSON_PATH.read_text(encoding="utf-8") == ndjson("popvault")
    assert [json.loads(line) for line in ndjson().splitlines()] == json.loads(
        json.dumps(saved_objects("popvault")))


def test_file_ships_as_package_data() -> None:
    packaged = resources.files("schemas").joinpath("kibana/saved_objects.ndjson")
    assert packaged.read_text(encoding="utf-8") == ndjson()


def test_every_line_is_a_saved_object(lines: list[dict[str, Any]]) -> None:
    assert lines
    for obj in lines:
        assert isinstance(obj["type"], str) and obj["type"]
        assert isinstance(obj["id"], str) and obj["id"]
        assert isinstance(obj["attributes"], dict) and obj["attributes"].get("title")
        assert isinstance(obj["references"], list)
        assert obj["coreMigrationVersion"] and obj["typeMigrationVersion"]
        for ref in obj["references"]:
            assert set(ref) == {"name", "type", "id"}, ref
    keys = [(o["type"], o["id"]) for o in lines]
    assert len(keys) == len(set(keys)), "duplicate ids"
    assert {o["type"] for o in lines} == {"index-pattern", "search", "lens", "dashboard"}


def test_ids_are_fixed_and_follow_the_prefix() -> None:
    assert saved_objects("popvault") == saved_objects("popvault")
    ids = object_ids("popvault")
    assert ids["data_view"] == "popvault-messages"
    other = saved_objects("acme")
    assert all(o["id"].startswith("acme-") for o in other)
    data_view = next(o for o in other if o["type"] == "index-pattern")
    assert data_view["attributes"]["title"] == "acme-messages"
    assert data_view["attributes"]["timeFieldName"] == "@timestamp"
    with pytest.raises(ConfigError):
        saved_objects("Bad Prefix")


def test_every_reference_resolves(lines: list[dict[str, Any]]) -> None:
    present = {(o["type"], o["id"]) for o in lines}
    for obj in lines:
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in present, f"{obj['id']}: dangling {ref}"


def test_named_references_are_the_ones_kibana_looks_up(lines: list[dict[str, Any]]) -> None:
    for obj in lines:
        names = {r["name"]: r for r in obj["references"]}
        attrs = obj["attributes"]
        if obj["type"] in ("search", "dashboard"):
            source = json.loads(attrs["kibanaSavedObjectMeta"]["searchSourceJSON"])
            if "indexRefName" in source:
                assert names[source["indexRefName"]]["type"] == "index-pattern"
        if obj["type"] == "lens":
            for layer_id in attrs["state"]["datasourceStates"]["formBased"]["layers"]:
                ref = names[f"indexpattern-datasource-layer-{layer_id}"]
                assert ref["type"] == "index-pattern"
        if obj["type"] == "dashboard":
            panels = json.loads(attrs["panelsJSON"])
            assert len(panels) == len(obj["references"])
            for panel in panels:
                ref = names[f"{panel['panelIndex']}:{panel['panelRefName']}"]
                assert ref["type"] == panel["type"]
                grid = panel["gridData"]
                assert grid["i"] == panel["panelIndex"] and grid["x"] + grid["w"] <= 48


def test_lens_layers_are_consistent(lines: list[dict[str, Any]]) -> None:
    for obj in (o for o in lines if o["type"] == "lens"):
        state = obj["attributes"]["state"]
        layers = state["datasourceStates"]["formBased"]["layers"]
        for layer in layers.values():
            assert set(layer["columnOrder"]) == set(layer["columns"]), obj["id"]
            for column in layer["columns"].values():
                order_by = column.get("params", {}).get("orderBy", {})
                if order_by.get("type") == "column":
                    assert order_by["columnId"] in layer["columns"], obj["id"]
        vis = state["visualization"]
        used: set[str] = set()
        for vis_layer in vis.get("layers", [vis]):
            assert vis_layer["layerId"] in layers, obj["id"]
            used |= {vis_layer.get("xAccessor"), vis_layer.get("splitAccessor")} - {None}
            used |= set(vis_layer.get("accessors", []) + vis_layer.get("primaryGroups", [])
                        + vis_layer.get("metrics", []))
            used |= {c["columnId"] for c in vis_layer.get("columns", [])}
        all_columns = {c for layer in layers.values() for c in layer["columns"]}
        assert used == all_columns, obj["id"]


def _used_fields(obj: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    """(field, aggregated?) for every field an object names."""
    attrs = obj["attributes"]
    if obj["type"] == "index-pattern":
        for name in json.loads(attrs.get("fieldFormatMap", "{}")):
            yield name, False
        yield attrs["timeFieldName"], True
    if obj["type"] in ("search", "dashboard"):
        source = json.loads(attrs["kibanaSavedObjectMeta"]["searchSourceJSON"])
        for name in kql_fields(source["query"]["query"]):
            yield name, False
        for flt in source.get("filter", []):
            yield flt["meta"]["key"], False
    if obj["type"] == "search":
        for name in attrs["columns"]:
            yield name, False
        for name, _direction in attrs["sort"]:
            yield name, True
    if obj["type"] == "lens":
        state = attrs["state"]
        for name in kql_fields(state["query"]["query"]):
            yield name, False
        for layer in state["datasourceStates"]["formBased"]["layers"].values():
            for column in layer["columns"].values():
                if column["sourceField"] != RECORDS_FIELD:
                    yield column["sourceField"], True


def test_every_field_is_mapped_and_aggregatable_where_aggregated(
        lines: list[dict[str, Any]], fields: dict[str, str]) -> None:
    seen = set()
    for obj in lines:
        for name, aggregated in _used_fields(obj):
            seen.add(name)
            assert name in fields, f"{obj['id']}: {name} is not in index_template.json"
            if aggregated:
                assert fields[name] in AGGREGATABLE, \
                    f"{obj['id']}: {name} is {fields[name]}, not aggregatable"
    # The panels the issue asks for, on the fields it names.
    assert {"popvault.accounts", "popvault.kind", "email.from.address",
            "email.attachments.file.extension", "email.attachments.file.mime_type",
            "popvault.thread.conversation_id", "@timestamp"} <= seen


def test_kind_values_in_queries_are_real_kinds(lines: list[dict[str, Any]]) -> None:
    queries = list(README_QUERIES)
    for obj in lines:
        if obj["type"] == "search":
            source = json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
            queries.append(source["query"]["query"])
    for query in queries:
        assert kql_values(query, "popvault.kind") <= KINDS, query


@pytest.mark.parametrize("query", README_QUERIES)
def test_readme_queries_use_mapped_fields(query: str, fields: dict[str, str]) -> None:
    names = kql_fields(query)
    assert names, query
    for name in names:
        assert name in fields and fields[name] != "object", f"{query}: {name}"


def test_kql_field_extraction() -> None:
    assert kql_fields("a.b : x and not c : (d or e)") == {"a.b", "c"}
    assert kql_fields('@timestamp >= "2026" and x.y: "a:b"') == {"x.y"}


# ----------------------------------------------------------------------------- HTTP stub


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Stub:
    url: str
    requests: list[Seen] = field(default_factory=list)
    status: int = 200
    reply: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def kibana() -> Iterator[Stub]:
    stub = Stub(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            stub.requests.append(Seen("POST", self.path, {k.lower(): v for k, v in
                                                          self.headers.items()},
                                      self.rfile.read(length)))
            body = json.dumps(stub.reply).encode()
            self.send_response(stub.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    stub.reply = _success()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _success() -> dict[str, Any]:
    objs = saved_objects()
    return {"success": True, "successCount": len(objs),
            "successResults": [{"type": o["type"], "id": o["id"], "overwrite": True,
                                "meta": {"title": o["attributes"]["title"]}} for o in objs]}


def _cli(args: list[str], env: dict[str, str] | None = None) -> Any:
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["kibana", "install", *args], env=env)


def _multipart_file(seen: Seen) -> bytes:
    boundary = seen.headers["content-type"].split("boundary=", 1)[1]
    parts = seen.body.split(b"--" + boundary.encode())
    assert parts[-1].strip() == b"--"
    (part,) = [p for p in parts[1:-1]]
    head, content = part.split(b"\r\n\r\n", 1)
    assert b'name="file"' in head and b'filename="' in head
    return content[:-2]  # the CRLF before the next boundary


def test_install_request_shape_with_api_key(kibana: Stub) -> None:
    result = _cli(["--url", kibana.url, "--api-key-env", "KB_KEY"],
                  env={"KB_KEY": "c2VjcmV0LWtleQ=="})
    assert result.exit_code == 0, result.output
    (seen,) = kibana.requests
    assert seen.method == "POST"
    assert seen.path == "/api/saved_objects/_import?overwrite=true"
    assert seen.headers["kbn-xsrf"] == "true"
    assert seen.headers["authorization"] == "ApiKey c2VjcmV0LWtleQ=="
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert _multipart_file(seen).decode() == ndjson()
    assert "c2VjcmV0LWtleQ" not in result.output
    assert f"{kibana.url}/app/dashboards#/view/popvault-overview" in result.output


def test_install_request_shape_with_space_basic_auth_and_prefix(kibana: Stub) -> None:
    result = _cli(["--url", kibana.url + "/kibana/", "--space", "support", "--prefix", "acme",
                   "--username", "elastic", "--password-env", "KB_PASS", "--json"],
                  env={"KB_PASS": "s3cret-pw"})
    assert result.exit_code == 0, result.output
    (seen,) = kibana.requests
    assert seen.path == "/kibana/s/support/api/saved_objects/_import?overwrite=true"
    expected = base64.b64encode(b"elastic:s3cret-pw").decode()
    assert seen.headers["authorization"] == f"Basic {expected}"
    assert _multipart_file(seen).decode() == ndjson("acme")
    assert "s3cret-pw" not in result.output and expected not in result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["space"] == "support"


def test_no_auth_sends_no_authorization_header(kibana: Stub) -> None:
    result = _cli(["--url", kibana.url])
    assert result.exit_code == 0, result.output
    assert "authorization" not in kibana.requests[0].headers


def test_per_object_errors_exit_non_zero_naming_the_objects(kibana: Stub) -> None:
    kibana.reply = {"success": False, "successCount": 9, "errors": [
        {"type": "lens", "id": "popvault-lens-top-senders", "meta": {"title": "Top senders"},
         "error": {"type": "missing_references",
                   "references": [{"type": "index-pattern", "id": "popvault-messages"}]}},
        {"type": "dashboard", "id": "popvault-overview", "title": "popvault: mail overview",
         "error": {"type": "unknown", "message": "boom", "statusCode": 400}},
    ]}
    result = _cli(["--url", kibana.url])
    assert result.exit_code == EXIT_FAILED
    assert "popvault-lens-top-senders" in result.output
    assert "popvault-overview" in result.output
    assert "index-pattern/popvault-messages" in result.output

    result = _cli(["--url", kibana.url, "--json"])
    assert result.exit_code == EXIT_FAILED
    data = json.loads(result.output)
    assert data["ok"] is False
    assert [e["id"] for e in data["errors"]] == ["popvault-lens-top-senders",
                                                 "popvault-overview"]


def test_401_is_an_auth_error_naming_the_url(kibana: Stub) -> None:
    kibana.status = 401
    kibana.reply = {"statusCode": 401, "error": "Unauthorized", "message": "missing auth"}
    result = _cli(["--url", kibana.url, "--username", "u", "--password-env", "KB_PASS"],
                  env={"KB_PASS": "hunter2-pw"})
    assert result.exit_code == EXIT_AUTH
    assert kibana.url in result.output and "401" in result.output
    assert "hunter2-pw" not in result.output


def test_other_http_refusal_exits_non_zero(kibana: Stub) -> None:
    kibana.status = 404
    kibana.reply = {"statusCode": 404, "message": "Not Found"}
    result = _cli(["--url", kibana.url, "--space", "nope"])
    assert result.exit_code == EXIT_FAILED
    assert "space 'nope'" in result.output


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _cli(["--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == EXIT_CONNECT
    assert f"http://127.0.0.1:{port}" in result.output
    assert "refused" in result.output


def test_credentials_in_url_are_refused_and_not_echoed() -> None:
    result = _cli(["--url", "http://admin:pa55word@127.0.0.1:9/"])
    assert result.exit_code == EXIT_CONFIG
    assert "pa55word" not in result.output
    assert "http://127.0.0.1:9" in result.output


def test_unset_secret_variable_is_a_config_error() -> None:
    result = _cli(["--url", "http://127.0.0.1:9", "--api-key-env", "POPVAULT_TEST_UNSET_KEY"],
                  env={"POPVAULT_TEST_UNSET_KEY": ""})
    assert result.exit_code == EXIT_CONFIG
    assert "POPVAULT_TEST_UNSET_KEY" in result.output


def test_bad_space_is_refused_before_any_request(kibana: Stub) -> None:
    result = _cli(["--url", kibana.url, "--space", "../x"])
    assert result.exit_code == EXIT_CONFIG
    assert kibana.requests == []
