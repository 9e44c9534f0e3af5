"""mbox/Maildir/.eml readers: byte-exact messages, offsets of damage, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.mailsources import (
    LINE_LIMIT_BYTES,
    NotAMailSource,
    SourceKind,
    detect_source,
    iter_eml_dir,
    iter_maildir,
    iter_mbox,
    mbox_entry,
    mboxrd_quote,
)
from tests import corpus

MSG_CRLF = b"From: a@example.test\r\nSubject: one\r\n\r\nbody line\r\n"
MSG_LF = b"From: b@example.test\nSubject: two\n\nsecond body\n"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_mbox_round_trip_crlf_and_lf(tmp_path: Path) -> None:
    mails = [*corpus.generate_mail(seed=3, n=20), MSG_LF]
    mbox = write(tmp_path / "a.mbox",
                 b"".join(mbox_entry(m, newline=b"\r\n" if m.endswith(b"\r\n") else b"\n")
                          for m in mails))
    got = list(iter_mbox(mbox))
    assert [g.error for g in got] == [None] * len(mails)
    assert [g.raw for g in got] == mails
    offsets = [g.ref.offset for g in got]
    data = mbox.read_bytes()
    assert all(data[o:o + 5] == b"From " for o in offsets)
    assert got[-1].end == len(data)


def test_mboxrd_unquoting_is_byte_exact(tmp_path: Path) -> None:
    body = (b"From: c@example.test\r\nSubject: quoting\r\n\r\n"
            b"From the start of a line\r\n>From once quoted\r\n>>From twice\r\n"
            b"not From here\r\n")
    written = mbox_entry(body, newline=b"\r\n")
    assert b"\r\n>From the start" in written and b"\r\n>>From once" in written
    assert b"\r\n>>>From twice" in written
    # Hand-written quoting, independent of the writer:
    mbox = write(tmp_path / "q.mbox",
                 b"From x Thu Jan  1 00:00:00 1970\r\n"
                 b"From: c@example.test\r\nSubject: quoting\r\n\r\n"
                 b">From the start of a line\r\n>>From once quoted\r\n>>>From twice\r\n"
                 b"not From here\r\n\r\n")
    (got,) = list(iter_mbox(mbox))
    assert got.raw == body
    assert mboxrd_quote(body) != body


def test_damage_is_reported_with_offsets_and_reading_goes_on(tmp_path: Path) -> None:
    good = corpus.generate_mail(seed=4, n=3)
    parts = [mbox_entry(good[0], newline=b"\r\n")]
    junk_at = len(b"".join(parts))
    parts.append(b"From junk Thu Jan  1 00:00:00 1970\n" + bytes(range(256)) * 4 + b"\n\n")
    nul_at = len(b"".join(parts))
    parts.append(b"\0" * 4096)  # a filesystem hole; the next envelope follows directly
    parts.append(mbox_entry(good[1], newline=b"\r\n"))
    empty_at = len(b"".join(parts))
    parts.append(b"From empty Thu Jan  1 00:00:00 1970\n\n")
    parts.append(mbox_entry(good[2], newline=b"\r\n"))
    cut_at = len(b"".join(parts))
    parts.append(mbox_entry(MSG_CRLF)[:-8])  # truncated mid-line
    mbox = write(tmp_path / "d.mbox", b"".join(parts))
    got = list(iter_mbox(mbox))
    assert [g.raw for g in got if g.error is None] == good
    errors = [(g.ref.offset, g.error) for g in got if g.error is not None]
    assert [o for o, _ in errors] == [junk_at, nul_at, empty_at, cut_at]
    assert "header block" in str(errors[0][1])
    assert "NUL" in str(errors[1][1])
    assert "empty" in str(errors[2][1])
    assert "truncated" in str(errors[3][1])


def test_lines_longer_than_the_read_limit(tmp_path: Path) -> None:
    long = (b"From: e@example.test\nSubject: long\n\n" + b"x" * (LINE_LIMIT_BYTES + 10)
            + b"From not a separator\n")
    mbox = write(tmp_path / "l.mbox", mbox_entry(long) + mbox_entry(MSG_LF))
    assert [g.raw for g in iter_mbox(mbox)] == [long, MSG_LF]


def test_maildir_and_eml_dir(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    write(md / "new" / "1.host", MSG_CRLF)
    write(md / "cur" / "2.host:2,S", MSG_LF)
    write(md / "cur" / "3.host:2,S", b"\x00\x01 not mail")
    write(md / "tmp" / "4.host", MSG_LF)
    got = list(iter_maildir(md))
    assert [g.raw for g in got if g.error is None] == [MSG_CRLF, MSG_LF]
    assert [g.ref.path.name for g in got if g.error] == ["3.host:2,S"]

    eml = tmp_path / "eml"
    (eml / "sub").mkdir(parents=True)
    write(eml / "a.eml", MSG_CRLF)
    write(eml / "sub" / "b.EML", MSG_LF)
    write(eml / "notes.txt", b"ignored")
    assert [g.raw for g in iter_eml_dir(eml)] == [MSG_CRLF, MSG_LF]

    assert detect_source(md) is SourceKind.MAILDIR
    assert detect_source(eml) is SourceKind.EML_DIR
    assert detect_source(write(tmp_path / "m", mbox_entry(MSG_LF))) is SourceKind.MBOX


@pytest.mark.parametrize("make", ["missing", "text", "emptydir"])
def test_detect_names_the_bad_path(tmp_path: Path, make: str) -> None:
    path = tmp_path / make
    if make == "text":
        write(path, b"hello\n")
    elif make == "emptydir":
        path.mkdir()
    with pytest.raises(NotAMailSource, match=str(path)):
        detect_source(path)
