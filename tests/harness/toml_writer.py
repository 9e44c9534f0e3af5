"""Minimal TOML writer for test configs (str/int/float/bool, lists of those, tables, arrays
of tables) so the harness needs no tomli-w; every output is re-parsed with tomllib."""

from __future__ import annotations

import math
import re
import tomllib
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _str(k)


def _str(s: str) -> str:
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table (only reached inside lists)
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _emit(data: dict[str, Any], path: list[str], out: list[str]) -> None:
    scalars = {k: v for k, v in data.items()
               if not isinstance(v, dict) and not _is_table_array(v)}
    for k, v in scalars.items():
        out.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        sub = [*path, _key(k)]
        if isinstance(v, dict):
            out.append("")
            out.append("[" + ".".join(sub) + "]")
            _emit(v, sub, out)
        elif _is_table_array(v):
            for item in v:
                out.append("")
                out.append("[[" + ".".join(sub) + "]]")
                _emit(item, sub, out)


def dumps(data: dict[str, Any]) -> str:
    out: list[str] = []
    _emit(data, [], out)
    text = "\n".join(out).lstrip("\n") + "\n"
    tomllib.loads(text)  # fail here, not in the code under test, if we wrote bad TOML
    return text


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` wins; nested tables are merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
