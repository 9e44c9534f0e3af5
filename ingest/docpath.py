"""Reading a document's field by its dotted name (``email.from.address``), as the index does.

Documents are nested dicts, and the sinks, threading and export all name fields the way
Elasticsearch does; one reading of such a name serves them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def field_value(doc: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted``, or None where the path breaks off (lists are not entered)."""
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def field_values(doc: Mapping[str, Any], dotted: str) -> list[Any]:
    """Every value at ``dotted``, lists along the way flattened (like ES object arrays);
    None values left out."""
    values: list[Any] = [doc]
    for part in dotted.split("."):
        nxt: list[Any] = []
        for v in values:
            for el in (v if isinstance(v, list) else [v]):
                if isinstance(el, Mapping) and part in el:
                    got = el[part]
                    nxt.extend(got if isinstance(got, list) else [got])
        values = nxt
    return [v for v in values if v is not None]
