"""Elasticsearch templates and the document JSON Schema, shipped as package data.

The JSON files hold ``"{prefix}"`` in their ``index_patterns``; :func:`index_template` and
:func:`receipts_template` substitute the configured index prefix there (and only there), so
one file serves every deployment and the tests' throwaway prefixes.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from importlib import resources
from typing import Any

PREFIX_PLACEHOLDER = "{prefix}"
INDEX_TEMPLATE_FILE = "index_template.json"
RECEIPTS_TEMPLATE_FILE = "receipts_template.json"
DOCUMENT_SCHEMA_FILE = "document.schema.json"
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
"""Elasticsearch index names: lowercase, no leading ``-``, ``_`` or ``+``."""


@cache
def _load(name: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"schemas/{name} is not a JSON object")
    return data


def load_json(name: str) -> dict[str, Any]:
    """A fresh copy of one packaged JSON file (callers may modify it)."""
    return copy.deepcopy(_load(name))


def _with_prefix(name: str, prefix: str) -> dict[str, Any]:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"index prefix {prefix!r} is not a valid Elasticsearch index name start "
            "(lowercase letters, digits, '_', '.', '-'; not starting with '_' or '-')"
        )
    body = load_json(name)
    body["index_patterns"] = [
        pattern.replace(PREFIX_PLACEHOLDER, prefix) for pattern in body["index_patterns"]
    ]
    return body


def index_template(prefix: str) -> dict[str, Any]:
    """Body for ``PUT _index_template/<prefix>-messages``."""
    return _with_prefix(INDEX_TEMPLATE_FILE, prefix)


def receipts_template(prefix: str) -> dict[str, Any]:
    """Body for ``PUT _index_template/<prefix>-receipts``."""
    return _with_prefix(RECEIPTS_TEMPLATE_FILE, prefix)


def document_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every built document validates against."""
    return load_json(DOCUMENT_SCHEMA_FILE)
