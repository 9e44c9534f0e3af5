"""Kibana saved objects for the archive (data view, searches, Lens, dashboard) and their import.

:func:`saved_objects` builds every object for one index prefix, with fixed ids derived from the
prefix, so installing twice overwrites instead of duplicating and two deployments with
different prefixes can share one Kibana space. ``schemas/kibana/saved_objects.ndjson`` is
:func:`ndjson` for the default prefix, committed so an operator can import it by hand (Stack
Management → Saved objects → Import); a unit test keeps it equal to the generated text.

Every field an object names is a field of ``schemas/index_template.json``; the unit tests walk
the mapping to prove it, and that aggregated fields have an aggregatable type. There is no
sender *domain* panel: ``email.from.address`` is one keyword and a domain would need either an
index-time field or a runtime field with a painless script; the second is slow on every query
and cannot be tested here, so the dashboard shows top senders only.

:func:`install` posts the objects to ``POST [/s/<space>]/api/saved_objects/_import?overwrite=true``
(multipart field ``file``, header ``kbn-xsrf``). Failures map onto the error tree: no
connection → :class:`~ingest.errors.ConnectError`, certificate → :class:`~ingest.errors.TLSError`,
401/403 → :class:`~ingest.errors.AuthError`, any other refusal → :class:`KibanaError`. A 200
whose body lists per-object ``errors`` is returned as an :class:`InstallResult` that is not
``ok``, naming each object, so the caller can print all of them. Messages name the URL without
credentials; credentials in the URL itself are refused (they would leak through ``ps``).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import schemas
from ingest.errors import AuthError, ConfigError, ConnectError, PopvaultError, TLSError
from ingest.pop3.tls import create_ssl_context, describe_verify_error

DEFAULT_PREFIX = "popvault"
CORE_MIGRATION_VERSION = "8.8.0"
"""Kibana's core saved-object format since 8.8; Kibana 9 still reads it."""
TYPE_MIGRATION_VERSIONS = {
    "index-pattern": "8.0.0",
    "search": "8.0.0",
    "lens": "8.9.0",
    "dashboard": "8.9.0",
}
"""The format each object is written in. Kibana runs only the migrations newer than these on
import, so they must not be older than the shapes used here (Lens ``formBased`` layers and pie
``metrics`` lists are 8.6+), nor newer than the oldest supported Kibana (9.x) knows."""

IMPORT_PATH = "/api/saved_objects/_import"
REQUEST_TIMEOUT_S = 60.0
"""Connect plus response; an import of a dozen objects takes well under a second."""
MAX_RESPONSE_BYTES = 1024 * 1024
"""Kibana's import answer is a few KB; anything past this is not an import answer."""
MAX_LISTED_ERRORS = 50
RECORDS_FIELD = "___records___"
"""Lens's pseudo-field for ``count`` (documents), not a mapped field."""
NDJSON_FILENAME = "popvault-saved-objects.ndjson"

_SPACE_RE = re.compile(r"^[a-z0-9_-]{1,128}$")
"""Kibana space ids: lowercase letters, digits, ``_`` and ``-`` (it lower-cases names itself)."""

# KQL used by the saved searches; the README lists the same syntax for users.
HUMAN_QUERY = "popvault.kind : human and not popvault.spam : true"
AUTO_QUERY = "popvault.kind : (auto_reply or bounce)"
ATTACHMENTS_QUERY = "popvault.has_attachments : true"


# --------------------------------------------------------------------------------------------
# Saved objects
# --------------------------------------------------------------------------------------------


def object_ids(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Every object's id, keyed by a short role name; the one place ids are built."""
    return {
        "data_view": f"{prefix}-messages",
        "search_human": f"{prefix}-search-human-mail",
        "search_auto": f"{prefix}-search-auto-replies-bounces",
        "search_attachments": f"{prefix}-search-with-attachments",
        "lens_volume_account": f"{prefix}-lens-volume-by-account",
        "lens_volume_kind": f"{prefix}-lens-volume-by-kind",
        "lens_top_senders": f"{prefix}-lens-top-senders",
        "lens_attachment_ext": f"{prefix}-lens-attachment-extensions",
        "lens_attachment_mime": f"{prefix}-lens-attachment-mime-types",
        "lens_threads": f"{prefix}-lens-largest-threads",
        "dashboard": f"{prefix}-overview",
    }


def _json(value: Any) -> str:
    """Kibana stores some attributes as JSON strings; sorted keys keep the file stable."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _envelope(kind: str, object_id: str, attributes: dict[str, Any],
              references: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "type": kind,
        "id": object_id,
        "attributes": attributes,
        "references": references,
        "coreMigrationVersion": CORE_MIGRATION_VERSION,
        "typeMigrationVersion": TYPE_MIGRATION_VERSIONS[kind],
        "managed": False,
    }


def _data_view(prefix: str, ids: dict[str, str]) -> dict[str, Any]:
    return _envelope("index-pattern", ids["data_view"], {
        "title": f"{prefix}-messages",
        "name": f"{prefix} messages",
        "timeFieldName": "@timestamp",
        "fieldFormatMap": _json({"email.attachments.file.size": {"id": "bytes"},
                                 "popvault.raw_size": {"id": "bytes"}}),
        "runtimeFieldMap": "{}",
        "fields": "[]",
        "typeMeta": "{}",
        "allowNoIndex": True,
    }, [])


def _saved_search(object_id: str, data_view_id: str, title: str, description: str,
                  query: str, columns: list[str]) -> dict[str, Any]:
    source = {
        "query": {"query": query, "language": "kuery"},
        "filter": [],
        "highlightAll": True,
        "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index",
    }
    return _envelope("search", object_id, {
        "title": title,
        "description": description,
        "columns": columns,
        "sort": [["@timestamp", "desc"]],
        "grid": {},
        "hideChart": False,
        "isTextBasedQuery": False,
        "kibanaSavedObjectMeta": {"searchSourceJSON": _json(source)},
    }, [{"name": "kibanaSavedObjectMeta.searchSourceJSON.index", "type": "index-pattern",
         "id": data_view_id}])


# Lens columns. Ids are fixed strings: Lens accepts any id and fixed ones keep the file stable.


def _count(label: str = "Messages") -> dict[str, Any]:
    return {"label": label, "customLabel": True, "dataType": "number", "operationType": "count",
            "sourceField": RECORDS_FIELD, "isBucketed": False, "scale": "ratio",
            "params": {"emptyAsNull": True}}


def _date_histogram() -> dict[str, Any]:
    return {"label": "@timestamp", "dataType": "date", "operationType": "date_histogram",
            "sourceField": "@timestamp", "isBucketed": True, "scale": "interval",
            "params": {"interval": "auto", "includeEmptyRows": True, "dropPartials": False}}


def _terms(source_field: str, label: str, *, size: int, order_by: str,
           other_bucket: bool) -> dict[str, Any]:
    return {"label": label, "customLabel": True, "dataType": "string", "operationType": "terms",
            "sourceField": source_field, "isBucketed": True, "scale": "ordinal",
            "params": {"size": size, "orderBy": {"type": "column", "columnId": order_by},
                       "orderDirection": "desc", "otherBucket": other_bucket,
                       "missingBucket": False, "parentFormat": {"id": "terms"},
                       "include": [], "exclude": [], "includeIsRegex": False,
                       "excludeIsRegex": False}}


def _lens(object_id: str, data_view_id: str, title: str, description: str, *,
          visualization_type: str, columns: dict[str, dict[str, Any]], column_order: list[str],
          visualization: dict[str, Any], query: str = "") -> dict[str, Any]:
    layer_id = "layer1"
    state = {
        "datasourceStates": {"formBased": {"layers": {layer_id: {
            "columns": columns, "columnOrder": column_order, "incompleteColumns": {}}}}},
        "visualization": visualization,
        "query": {"query": query, "language": "kuery"},
        "filters": [],
        "adHocDataViews": {},
        "internalReferences": [],
    }
    return _envelope("lens", object_id, {
        "title": title,
        "description": description,
        "visualizationType": visualization_type,
        "state": state,
    }, [{"name": f"indexpattern-datasource-layer-{layer_id}", "type": "index-pattern",
         "id": data_view_id}])


def _volume(object_id: str, data_view_id: str, title: str, split_field: str,
            split_label: str) -> dict[str, Any]:
    """Stacked bars of messages over time, one colour per value of ``split_field``."""
    columns = {"split": _terms(split_field, split_label, size=10, order_by="count",
                               other_bucket=True),
               "date": _date_histogram(), "count": _count()}
    return _lens(object_id, data_view_id, title, f"Messages per interval by {split_label}.",
                 visualization_type="lnsXY", columns=columns,
                 column_order=["split", "date", "count"],
                 visualization={
                     "legend": {"isVisible": True, "position": "right"},
                     "valueLabels": "hide", "fittingFunction": "None",
                     "preferredSeriesType": "bar_stacked",
                     "layers": [{"layerId": "layer1", "layerType": "data",
                                 "seriesType": "bar_stacked", "xAccessor": "date",
                                 "accessors": ["count"], "splitAccessor": "split"}]})


def _donut(object_id: str, data_view_id: str, title: str, description: str, source_field: str,
           label: str, query: str) -> dict[str, Any]:
    columns = {"group": _terms(source_field, label, size=10, order_by="count", other_bucket=True),
               "count": _count()}
    return _lens(object_id, data_view_id, title, description, visualization_type="lnsPie",
                 columns=columns, column_order=["group", "count"], query=query,
                 visualization={"shape": "donut", "layers": [{
                     "layerId": "layer1", "layerType": "data", "primaryGroups": ["group"],
                     "metrics": ["count"], "numberDisplay": "value",
                     "categoryDisplay": "default", "legendDisplay": "default",
                     "nestedLegend": False}]})


def _table(object_id: str, data_view_id: str, title: str, description: str, source_field: str,
           label: str, size: int) -> dict[str, Any]:
    columns = {"group": _terms(source_field, label, size=size, order_by="count",
                               other_bucket=False),
               "count": _count()}
    return _lens(object_id, data_view_id, title, description,
                 visualization_type="lnsDatatable", columns=columns,
                 column_order=["group", "count"],
                 visualization={"layerId": "layer1", "layerType": "data",
                                "columns": [{"columnId": "group"}, {"columnId": "count"}],
                                "sorting": {"columnId": "count", "direction": "desc"}})


@dataclass(frozen=True)
class _Panel:
    """One dashboard panel: which object, where (Kibana's grid is 48 columns wide)."""

    kind: str
    object_id: str
    x: int
    y: int
    w: int
    h: int


def _dashboard(prefix: str, ids: dict[str, str], panels: list[_Panel]) -> dict[str, Any]:
    panels_json: list[dict[str, Any]] = []
    references: list[dict[str, str]] = []
    for number, panel in enumerate(panels, start=1):
        index = f"p{number}"
        panels_json.append({"type": panel.kind, "panelIndex": index,
                            "gridData": {"x": panel.x, "y": panel.y, "w": panel.w,
                                         "h": panel.h, "i": index},
                            "embeddableConfig": {}, "panelRefName": f"panel_{index}"})
        # Kibana 8+ names a panel's reference "<panelIndex>:panel_<panelIndex>".
        references.append({"name": f"{index}:panel_{index}", "type": panel.kind,
                           "id": panel.object_id})
    return _envelope("dashboard", ids["dashboard"], {
        "title": f"{prefix}: mail overview",
        "description": (
            "Volume by account and kind, top senders, attachment types, largest threads. "
            "Sender domains are not shown: the index has no domain field (it would need an "
            "index-time field; a painless runtime field would slow every query)."),
        "panelsJSON": _json(panels_json),
        "optionsJSON": _json({"useMargins": True, "syncColors": False, "syncCursor": True,
                              "syncTooltips": False, "hidePanelTitles": False}),
        "timeRestore": True,
        "timeFrom": "now-30d",
        "timeTo": "now",
        "refreshInterval": {"pause": True, "value": 60000},
        "kibanaSavedObjectMeta": {"searchSourceJSON": _json(
            {"query": {"query": "", "language": "kuery"}, "filter": []})},
    }, references)


def saved_objects(prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Every saved object for ``prefix``, referenced objects before the ones referring to them."""
    _check_prefix(prefix)
    ids = object_ids(prefix)
    dv = ids["data_view"]
    searches = [
        _saved_search(ids["search_human"], dv, "Human mail per account",
                      "Mail written by people (not auto-replies, bounces, lists or spam).",
                      HUMAN_QUERY, ["popvault.accounts", "email.from.address", "email.subject"]),
        _saved_search(ids["search_auto"], dv, "Auto-replies and bounces",
                      "Out-of-office answers and delivery status notifications.",
                      AUTO_QUERY, ["popvault.accounts", "popvault.kind", "email.from.address",
                                   "email.subject", "popvault.bounce.recipients",
                                   "popvault.bounce.status"]),
        _saved_search(ids["search_attachments"], dv, "Messages with attachments",
                      "Messages carrying at least one attachment, with the file names.",
                      ATTACHMENTS_QUERY, ["popvault.accounts", "email.from.address",
                                          "email.subject", "email.attachments.file.name",
                                          "popvault.attachment_count"]),
    ]
    lenses = [
        _volume(ids["lens_volume_account"], dv, "Messages over time by account",
                "popvault.accounts", "Account"),
        _volume(ids["lens_volume_kind"], dv, "Messages over time by kind",
                "popvault.kind", "Kind"),
        _lens(ids["lens_top_senders"], dv, "Top senders", "The 15 most frequent From addresses.",
              visualization_type="lnsXY",
              columns={"sender": _terms("email.from.address", "Sender", size=15,
                                        order_by="count", other_bucket=False),
                       "count": _count()},
              column_order=["sender", "count"],
              visualization={"legend": {"isVisible": False, "position": "right"},
                             "valueLabels": "show", "fittingFunction": "None",
                             "preferredSeriesType": "bar_horizontal",
                             "layers": [{"layerId": "layer1", "layerType": "data",
                                         "seriesType": "bar_horizontal", "xAccessor": "sender",
                                         "accessors": ["count"]}]}),
        _donut(ids["lens_attachment_ext"], dv, "Attachment types (extension)",
               "Messages per attachment file extension (a message counts once per extension).",
               "email.attachments.file.extension", "Extension", ATTACHMENTS_QUERY),
        _donut(ids["lens_attachment_mime"], dv, "Attachment MIME types",
               "Messages per attachment MIME type (a message counts once per type).",
               "email.attachments.file.mime_type", "MIME type", ATTACHMENTS_QUERY),
        _table(ids["lens_threads"], dv, "Largest threads",
               "Conversations with the most messages in the time range.",
               "popvault.thread.conversation_id", "Conversation", 20),
    ]
    dashboard = _dashboard(prefix, ids, [
        _Panel("lens", ids["lens_volume_account"], 0, 0, 24, 15),
        _Panel("lens", ids["lens_volume_kind"], 24, 0, 24, 15),
        _Panel("lens", ids["lens_top_senders"], 0, 15, 16, 15),
        _Panel("lens", ids["lens_attachment_ext"], 16, 15, 16, 15),
        _Panel("lens", ids["lens_attachment_mime"], 32, 15, 16, 15),
        _Panel("lens", ids["lens_threads"], 0, 30, 16, 15),
        _Panel("search", ids["search_human"], 16, 30, 32, 15),
    ])
    return [_data_view(prefix, ids), *searches, *lenses, dashboard]


def ndjson(prefix: str = DEFAULT_PREFIX) -> str:
    """The objects as Kibana's import format: one JSON object per line, keys sorted."""
    return "".join(_json(obj) + "\n" for obj in saved_objects(prefix))


def _check_prefix(prefix: str) -> None:
    """The index template's rule for prefixes, as a :class:`ConfigError` naming the prefix."""
    try:
        schemas.index_template(prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Import into Kibana
# --------------------------------------------------------------------------------------------


class KibanaError(PopvaultError):
    """Raised when Kibana refuses the import request as a whole (4xx other than 401/403, 5xx)."""

    stage = "kibana"


@dataclass(frozen=True)
class ObjectError:
    """One object Kibana did not import, from the ``errors`` list of its answer."""

    type: str
    id: str
    title: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "id": self.id, "title": self.title, "reason": self.reason}


@dataclass(frozen=True)
class InstallResult:
    """What Kibana said about one import; ``url`` never carries credentials."""

    url: str
    space: str | None
    success_count: int
    imported: list[tuple[str, str]] = field(default_factory=list)
    errors: list[ObjectError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dashboard_url: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "space": self.space, "ok": self.ok,
                "success_count": self.success_count,
                "imported": [{"type": t, "id": i} for t, i in self.imported],
                "errors": [e.to_dict() for e in self.errors], "warnings": self.warnings,
                "dashboard_url": self.dashboard_url}


def import_url(base_url: str, space: str | None) -> str:
    """``<base>[/s/<space>]/api/saved_objects/_import?overwrite=true``; a base path is kept."""
    base = base_url.rstrip("/")
    space_part = f"/s/{space}" if space and space != "default" else ""
    return f"{base}{space_part}{IMPORT_PATH}?overwrite=true"


def _checked_base(url: str) -> str:
    """The base URL, refused if it is not http(s) or carries credentials (they leak via ``ps``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Kibana URL {_safe_url(url)!r} must be http:// or https://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"Kibana URL {_safe_url(url)!r} carries credentials; use --api-key-env "
                          "or --username with --password-env instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"Kibana URL {_safe_url(url)!r} must not have a query or fragment")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _safe_url(url: str) -> str:
    """``url`` with any ``user:password@`` removed, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _auth_header(api_key: str | None, username: str | None, password: str | None) -> str | None:
    if api_key and (username or password):
        raise ConfigError("give either an API key or a username and password, not both")
    if api_key:
        return f"ApiKey {api_key.strip()}"
    if username is not None or password is not None:
        if not username or password is None:
            raise ConfigError("basic authentication needs both a username and a password")
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return f"Basic {token}"
    return None


def multipart_body(text: str, boundary: str) -> bytes:
    """A ``multipart/form-data`` body with one part, field ``file``, holding ``text``."""
    return (f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{NDJSON_FILENAME}"\r\n'
            "Content-Type: application/ndjson\r\n\r\n").encode() + text.encode("utf-8") + (
            f"\r\n--{boundary}--\r\n").encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would replay the POST without its body, or send credentials elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def install(url: str, *, space: str | None = None, api_key: str | None = None,
            username: str | None = None, password: str | None = None,
            ca_file: Path | None = None, verify: bool = True,
            prefix: str = DEFAULT_PREFIX) -> InstallResult:
    """Import (overwriting) every saved object for ``prefix`` into Kibana at ``url``.

    Raises :class:`ConfigError` for bad arguments, :class:`ConnectError`, :class:`TLSError`,
    :class:`AuthError` (401/403) or :class:`KibanaError` when the request as a whole fails;
    per-object failures come back in :attr:`InstallResult.errors`.
    """
    base = _checked_base(url)
    shown = _safe_url(base)
    if space is not None and not _SPACE_RE.match(space):
        raise ConfigError(f"Kibana space {space!r} is not a space id "
                          "(lowercase letters, digits, '_' and '-')")
    text = ndjson(prefix)
    boundary = "popvault-" + secrets.token_hex(16)
    while boundary in text:  # pragma: no cover - 128 random bits
        boundary = "popvault-" + secrets.token_hex(16)
    headers = {"kbn-xsrf": "true",
               "Content-Type": f"multipart/form-data; boundary={boundary}",
               "Accept": "application/json"}
    auth = _auth_header(api_key, username, password)
    if auth:
        headers["Authorization"] = auth
    target = import_url(base, space)
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if base.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=create_ssl_context(ca_file, verify)))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(target, data=multipart_body(text, boundary),
                                     headers=headers, method="POST")
    where = f"Kibana at {shown}" + (f" (space {space})" if space else "")
    status, body = _send(opener, request, where)
    if status in (401, 403):
        raise AuthError(f"{where} refused the credentials (HTTP {status}); "
                        + ("check the API key or user" if auth else
                           "it needs --api-key-env or --username/--password-env"),
                        server_reply=_kibana_message(body))
    if 300 <= status < 400:
        raise KibanaError(f"{where} answered HTTP {status} (a redirect); give the URL Kibana "
                          "itself serves, including any base path")
    if status == 404 and space:
        raise KibanaError(f"{where} answered HTTP 404: does space {space!r} exist?",
                          server_reply=_kibana_message(body))
    if status != 200:
        raise KibanaError(f"{where} refused the import (HTTP {status})",
                          server_reply=_kibana_message(body))
    try:
        answer = json.loads(body)
    except ValueError:
        raise KibanaError(f"{where} answered 200 but not with JSON; is this Kibana?") from None
    if not isinstance(answer, dict) or "success" not in answer:
        raise KibanaError(f"{where} answered 200 without an import result; is this Kibana?")
    return _result(answer, shown, space, base)


def _send(opener: urllib.request.OpenerDirector, request: urllib.request.Request,
          where: str) -> tuple[int, str]:
    """POST and return (status, body text); network and TLS trouble become our errors."""
    try:
        with opener.open(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return int(resp.status), resp.read(MAX_RESPONSE_BYTES).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            text = exc.read(MAX_RESPONSE_BYTES).decode("utf-8", "replace")
        except Exception:  # the error body is a courtesy; the status is what counts
            text = ""
        return int(exc.code), text
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            host = urlsplit(request.full_url).hostname or ""
            raise TLSError(f"{where}: {describe_verify_error(reason, host)}") from None
        if isinstance(reason, ssl.SSLError):
            raise TLSError(f"{where}: TLS failed: {reason.reason or reason}") from None
        if isinstance(reason, TimeoutError):
            raise ConnectError(f"{where}: no answer within {REQUEST_TIMEOUT_S:.0f}s") from None
        if isinstance(reason, ConnectionRefusedError):
            raise ConnectError(f"{where}: connection refused; is Kibana running and is the "
                               "port right?") from None
        raise ConnectError(f"{where}: cannot connect: {reason}") from None
    except TimeoutError:
        raise ConnectError(f"{where}: no answer within {REQUEST_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise ConnectError(f"{where}: connection failed: {exc}") from None


def _kibana_message(body: str) -> str | None:
    """Kibana's own error text (``message``), or the start of the body; shown as untrusted."""
    try:
        data = json.loads(body)
    except ValueError:
        return body or None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return body or None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _result(answer: dict[str, Any], shown: str, space: str | None, base: str) -> InstallResult:
    errors: list[ObjectError] = []
    for item in answer.get("errors") or []:
        if not isinstance(item, dict):
            continue
        error = _dict(item.get("error"))
        reason = str(error.get("type", "unknown"))
        if error.get("message"):
            reason = f"{reason}: {error['message']}"
        missing = [f"{r.get('type')}/{r.get('id')}" for r in error.get("references") or []
                   if isinstance(r, dict)]
        if missing:
            reason = f"{reason} ({', '.join(missing)})"
        meta = _dict(item.get("meta"))
        errors.append(ObjectError(type=str(item.get("type", "?")), id=str(item.get("id", "?")),
                                  title=str(item.get("title") or meta.get("title") or ""),
                                  reason=reason[:500]))
    if answer.get("success") is not True and not errors:
        errors.append(ObjectError(type="?", id="?", title="",
                                  reason="Kibana reported success=false without details"))
    imported = [(str(r.get("type")), str(r.get("id"))) for r in answer.get("successResults") or []
                if isinstance(r, dict)]
    warnings = [str(w.get("message", w)) if isinstance(w, dict) else str(w)
                for w in answer.get("warnings") or []]
    space_part = f"/s/{space}" if space and space != "default" else ""
    dashboard_id = _dashboard_id(answer)
    return InstallResult(
        url=shown, space=space, success_count=int(answer.get("successCount") or 0),
        imported=imported, errors=errors[:MAX_LISTED_ERRORS], warnings=warnings,
        dashboard_url=(f"{base}{space_part}/app/dashboards#/view/{dashboard_id}"
                       if dashboard_id else ""))


def _dashboard_id(answer: dict[str, Any]) -> str | None:
    """The dashboard's id as Kibana imported it (``destinationId`` if it chose another)."""
    for item in answer.get("successResults") or []:
        if isinstance(item, dict) and item.get("type") == "dashboard":
            return str(item.get("destinationId") or item.get("id"))
    return None
