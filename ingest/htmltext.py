"""HTML mail bodies as searchable plain text, behind one function so the converter can change.

html2text is used because a tag-stripping regex loses structure (paragraphs, list items,
link targets) and leaves ``<style>``/``<script>`` content in the index. Output is tuned for
search, not for display: no line wrapping, no Markdown emphasis marks, images reduced to their
alt text, link URLs kept (people search for them).
"""

from __future__ import annotations

import re

MAX_HTML_CHARS = 4_000_000
"""HTML beyond this is cut before conversion: html2text is pure Python and linear but slow."""

_BLANK_RUNS = re.compile(r"\n{3,}")


def html_to_text(html: str, *, max_html_chars: int = MAX_HTML_CHARS) -> str:
    """Convert an HTML body to plain text; never raises (falls back to dropping tags)."""
    import html2text  # imported here: only HTML-only mail pays for it

    html = html[:max_html_chars]
    converter = html2text.HTML2Text(bodywidth=0)
    converter.ignore_emphasis = True
    converter.ignore_images = False
    converter.images_to_alt = True
    converter.ignore_tables = False
    converter.unicode_snob = True
    converter.single_line_break = False
    try:
        text = converter.handle(html)
    except Exception:  # a converter bug must not cost us the body
        text = _strip_tags(html)
    return _BLANK_RUNS.sub("\n\n", text).strip()


_TAG = re.compile(r"<[^>]*>")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)


def _strip_tags(html: str) -> str:
    """Last-resort conversion used only when html2text fails."""
    import html as html_module

    return html_module.unescape(_TAG.sub(" ", _SCRIPT_STYLE.sub(" ", html)))
