"""Attachment text: real PDF, DOCX, XLSX, ODT, HTML and text files made here, in real messages."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from typing import Any

import pytest

from ingest import attachtext
from ingest.attachtext import AttachmentTexts, TextKind, text_kind
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from tests.unit.test_document import assert_valid

PDF_MIME = "application/pdf"
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX_MIME = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
ODT_MIME = "application/vnd.oasis.opendocument.text"


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF (one Helvetica text line per page), xref offsets computed."""
    count = len(pages)
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count))
        + b"] /Count %d >>" % count,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        stream = b"BT /F1 12 Tf 72 720 Td (" + text.encode("latin-1") + b") Tj ET"
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def make_docx(text: str) -> bytes:
    import docx

    document = docx.Document()
    document.add_paragraph(text)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "cell phrase"
    table.rows[0].cells[1].text = "second cell"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_xlsx(text: str) -> bytes:
    import openpyxl

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "Ledger"
    sheet.append(["account", "amount"])
    sheet.append([text, 1234.5])
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def make_odt(text: str) -> bytes:
    from odf.opendocument import OpenDocumentText
    from odf.text import H, P

    document = OpenDocumentText()
    document.text.addElement(H(outlinelevel=1, text="Heading words"))
    document.text.addElement(P(text=text))
    buffer = io.BytesIO()
    document.write(buffer)
    return buffer.getvalue()


def message(*files: tuple[str, str, bytes], body: str = "see attached") -> bytes:
    mail = EmailMessage()
    mail["From"] = "Compliance <compliance@example.com>"
    mail["To"] = "archive@example.com"
    mail["Subject"] = "Quarterly filings"
    mail["Date"] = "Mon, 5 Jan 2026 10:00:00 +0000"
    mail["Message-ID"] = "<filings-q4@example.com>"
    mail.set_content(body)
    for name, mime, data in files:
        maintype, subtype = mime.split("/", 1)
        mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return mail.as_bytes().replace(b"\n", b"\r\n")


def build(raw: bytes) -> dict[str, Any]:
    doc = build_document(raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw),
                         first_archived="2026-09-01T12:00:00Z")
    assert_valid(doc)
    return doc


@pytest.mark.parametrize(("name", "mime", "data", "phrase"), [
    ("filing.pdf", PDF_MIME, make_pdf(["Pelican settlement agreement"]),
     "Pelican settlement agreement"),
    ("memo.docx", DOCX_MIME, make_docx("Heron merger memorandum"), "Heron merger memorandum"),
    ("memo.docx", DOCX_MIME, make_docx("x"), "cell phrase\tsecond cell"),
    ("ledger.xlsx", XLSX_MIME, make_xlsx("Kestrel escrow"), "Kestrel escrow\t1234.5"),
    ("minutes.odt", ODT_MIME, make_odt("Osprey board minutes"), "Osprey board minutes"),
    ("minutes.odt", ODT_MIME, make_odt("x"), "Heading words"),
    ("page.html", "text/html", b"<p>Plover <b>policy</b> &amp; terms</p><script>no()</script>",
     "Plover policy & terms"),
    ("notes.txt", "text/plain", "Grebe notes, caf\u00e9".encode(), "Grebe notes, caf\u00e9"),
    ("scan.bin", "application/octet-stream", make_pdf(["Unnamed PDF magic"]),
     "Unnamed PDF magic"),
])
def test_phrase_is_found_in_attachment_text(name: str, mime: str, data: bytes,
                                            phrase: str) -> None:
    pv = build(message((name, mime, data)))["popvault"]
    assert phrase in pv["attachment_text"]
    assert "attachment_errors" not in pv
    assert "Plover" not in pv["body_text"]  # attachments stay out of the body


def test_corrupt_pdf_is_flagged_and_the_rest_survives() -> None:
    good = make_docx("Heron merger memorandum")
    broken = make_pdf(["Broken"])[:60] + b"\x00garbage" * 50
    doc = build(message(("report.pdf", PDF_MIME, broken), ("memo.docx", DOCX_MIME, good),
                        body="body words stay"))
    pv = doc["popvault"]
    assert pv["parse_status"] == "ok"
    assert len(pv["attachment_errors"]) == 1
    assert pv["attachment_errors"][0].startswith("report.pdf: ")
    assert "Heron merger memorandum" in pv["attachment_text"]
    assert "body words stay" in pv["body_text"]
    assert [a["file"]["name"] for a in doc["email"]["attachments"]] == ["report.pdf", "memo.docx"]


def test_not_a_pdf_is_flagged_without_parsing() -> None:
    pv = build(message(("report.pdf", PDF_MIME, b"random bytes, not a PDF")))["popvault"]
    assert pv["attachment_errors"] == ["report.pdf: NotPdf"]
    assert "attachment_text" not in pv


def test_plain_messages_get_no_attachment_fields() -> None:
    pv = build(message())["popvault"]
    assert "attachment_text" not in pv and "attachment_errors" not in pv


def test_images_and_archives_are_not_read() -> None:
    texts = AttachmentTexts()
    texts.add("photo.jpg", "image/jpeg", b"\xff\xd8\xff" + b"Pelican" * 10)
    texts.add("bundle.zip", "application/zip", b"PK\x03\x04")
    assert texts.texts == [] and texts.errors == []


def test_size_limit() -> None:
    texts = AttachmentTexts(max_attachment_bytes=100)
    texts.add("big.txt", "text/plain", b"a" * 101)
    texts.add("small.txt", "text/plain", b"tiny text")
    assert texts.errors == ["big.txt: TooLarge (101 bytes > 100)"]
    assert texts.text == "tiny text"


def test_per_attachment_and_per_message_caps() -> None:
    texts = AttachmentTexts(max_chars_per_attachment=50, max_chars_per_message=80)
    texts.add("a.txt", "text/plain", b"alpha " * 100)
    texts.add("b.txt", "text/plain", b"beta " * 100)
    texts.add("c.txt", "text/plain", b"gamma " * 100)
    assert len(texts.texts[0]) == 50
    assert texts.errors[:2] == ["a.txt: Truncated", "b.txt: Truncated"]
    assert texts.errors[2] == "c.txt: MessageTextLimit"
    assert len(texts.text) <= 80


def test_pdf_page_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachtext, "MAX_PDF_PAGES", 2)
    texts = AttachmentTexts()
    texts.add("long.pdf", PDF_MIME, make_pdf(["page one", "page two", "page three"]))
    assert "page two" in texts.text and "page three" not in texts.text
    assert texts.errors == ["long.pdf: PageLimit (3 pages > 2)"]


def test_time_budget_stops_between_chunks() -> None:
    ticks = iter(range(1000))
    texts = AttachmentTexts(attachment_budget_s=1.5, clock=lambda: float(next(ticks)))
    texts.add("long.pdf", PDF_MIME, make_pdf(["page one", "page two", "page three"]))
    assert "page one" in texts.text and "page three" not in texts.text
    assert texts.errors == ["long.pdf: TimeBudget"]


def test_zip_bomb_is_refused_before_inflating() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b"\0" * (attachtext.MAX_UNZIPPED_BYTES + 1))
    texts = AttachmentTexts()
    texts.add("bomb.docx", DOCX_MIME, buffer.getvalue())
    assert texts.errors[0].startswith("bomb.docx: ZipBomb")


@pytest.mark.parametrize(("name", "mime", "data"), [
    ("x.docx", DOCX_MIME, b"PK\x03\x04 not really a zip"),
    ("x.xlsx", XLSX_MIME, make_docx("wrong container")),
    ("x.odt", ODT_MIME, b""),
    ("x.txt", "text/plain", b"\x00\x01\x02binary"),
])
def test_broken_files_are_flagged_never_raised(name: str, mime: str, data: bytes) -> None:
    texts = AttachmentTexts()
    texts.add(name, mime, data)
    assert len(texts.errors) == 1 and texts.errors[0].startswith(f"{name}: ")


def test_kind_detection_prefers_the_extension() -> None:
    assert text_kind("Report.PDF", "application/octet-stream", b"") is TextKind.PDF
    assert text_kind(None, XLSX_MIME, b"") is TextKind.XLSX
    assert text_kind(None, "application/octet-stream", b"junk%PDF-1.7") is TextKind.PDF
    assert text_kind("photo.jpg", "image/jpeg", b"") is None


def _item(doc: dict[str, Any], uidl: str) -> Any:
    from ingest.sinks.base import IndexItem

    pv = doc["popvault"]
    return IndexItem(message_key=pv["message_key"], account_id="compliance", uidl=uidl,
                     raw_sha256=pv["raw_sha256"], raw_size=pv["raw_size"], document=doc)


def test_attachment_text_is_searchable_in_the_embedded_sink(tmp_path: Any) -> None:
    from ingest.sinks.embedded import EmbeddedSink

    sink = EmbeddedSink(tmp_path / "index.sqlite3")
    doc = build(message(("filing.pdf", PDF_MIME, make_pdf(["Pelican settlement agreement"]))))
    sink.write([_item(doc, "u1")])
    assert sink.search('"pelican settlement"').total == 1
    assert sink.search("pelican -filename:filing").total == 0  # found by text, not by name
    assert sink.search("subject:pelican").total == 0


def test_version_1_embedded_index_is_migrated(tmp_path: Any) -> None:
    """A file written before attachment text keeps its documents and search rows."""
    import sqlite3

    from ingest.sinks import embedded
    from ingest.sinks.embedded import EmbeddedSink

    path = tmp_path / "index.sqlite3"
    old = [s.replace(", attachment_text", "") for s in embedded._SCHEMA]
    with sqlite3.connect(path) as conn:
        for statement in old:
            conn.execute(statement)
        conn.execute("INSERT INTO documents(message_key, timestamp_ms, has_attachments, json) "
                     "VALUES ('k1', 0, 0, '{\"email\": {\"subject\": \"heron\"}}')")
        conn.execute("INSERT INTO fts(message_key, subject, body_text) "
                     "VALUES ('k1', 'heron', 'old body words')")
        conn.execute("PRAGMA user_version = 1")
    sink = EmbeddedSink(path)
    assert [h.message_key for h in sink.search('"old body words"').hits] == ["k1"]
    doc = build(message(("filing.pdf", PDF_MIME, make_pdf(["Pelican settlement agreement"]))))
    sink.write([_item(doc, "u1")])
    assert sink.search("pelican").total == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == embedded.SCHEMA_VERSION == 2
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'fts_v1'").fetchall()
