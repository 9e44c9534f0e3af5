"""Retention: which archived messages have outlived their rule, and removing them safely.

Configuration (``[retention]`` in the TOML file)::

    [retention]
    default = "10y"            # or: keep_forever = true  (one of the two is required)
    batch_size = 500           # optional: documents per delete batch (one audit entry each)

    [[retention.rules]]        # first matching rule wins, in file order
    name = "finance"
    keep = "7y"                # <N>d | <N>w | <N>m (months) | <N>y, or "forever"
    match = { account = "finance", from_domain = "bank.example", query = "has:attachment" }

A rule's ``match`` keys are ANDed; each value is a string or a list of strings (any of them):
``account`` (seen in that account), ``from_domain`` / ``to_domain`` (sender / a To, Cc or Bcc
recipient at exactly that domain), ``address`` (that address as sender or recipient), ``query``
(popvault search syntax, evaluated by the sink exactly as ``popvault search`` does). A message
expires when ``@timestamp`` + ``keep`` (calendar arithmetic) is not after now. A message with no
readable ``@timestamp`` never expires.

A message matching any *active* legal hold (:mod:`ingest.holds`, evaluated at apply time) never
expires, whatever the rules. Applying, per batch:

1. an audit entry (:mod:`ingest.audit`) naming the keys and the rules, *before* anything
   changes: a crash afterwards leaves an entry for a batch the next run repeats, never a
   deletion without an entry;
2. the batch's receipts are set to ``expired`` (kept, so their UIDLs are never fetched again);
3. the documents are deleted by ``_id``.

Receipts go before documents because the reverse order, interrupted, would leave live receipts
of a deleted document. After all batches, raw objects are deleted if no remaining document and
no non-expired receipt refers to them (one raw object can back several receipts: references are
recomputed across all of them, after the deletions). Candidates are the raw objects of every
expired receipt plus this run's documents, so a run that stopped before this step is completed
by the next one. Running ``apply`` again with nothing expired changes nothing and records
nothing.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.archive import RawStore
from ingest.audit import Action, AuditLog, default_actor, keys_digest, keys_summary
from ingest.config import Config
from ingest.errors import ConfigError
from ingest.filelock import exclusive_lock
from ingest.holds import Hold, HoldStore
from ingest.outcome import ReceiptStatus
from ingest.searchquery import QuerySyntaxError, parse_query
from ingest.sinks.lifecycle import DocInfo, Lifecycle, lifecycle_for, receipts_by_key

DEFAULT_BATCH_SIZE = 500
"""Documents per delete batch; each batch is one audit entry, one receipt update and one
document delete request."""
MAX_BATCH_SIZE = 10_000
DEFAULT_RULE = "(default)"
"""Name the fall-back rule has in plans and audit entries."""
LOCK_FILE = "retention.lock"
SCHEDULED_ACTOR = "popvault-scheduler"
"""Actor recorded for runs started by the Celery beat task."""
MATCH_KEYS = ("account", "from_domain", "to_domain", "address", "query")
_DURATION_RE = re.compile(r"^([1-9][0-9]{0,4})([dwmy])$")
FOREVER = "forever"


@dataclass(frozen=True)
class Duration:
    """A retention period: calendar months and days (a year is 12 months, a week 7 days)."""

    months: int = 0
    days: int = 0
    text: str = ""

    def after(self, start: dt.datetime) -> dt.datetime:
        """``start`` plus this duration; month ends clamp (Feb 29 + 1y = Feb 28)."""
        total = start.year * 12 + (start.month - 1) + self.months
        year, month = divmod(total, 12)
        month += 1
        day = min(start.day, calendar.monthrange(year, month)[1])
        return start.replace(year=year, month=month, day=day) + dt.timedelta(days=self.days)


def parse_duration(text: str) -> Duration:
    """``7y``, ``18m``, ``6w``, ``90d``; raise ValueError otherwise."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration; use <N>d, <N>w, <N>m or <N>y, e.g. 7y")
    n, unit = int(m.group(1)), m.group(2)
    if unit == "y":
        return Duration(months=12 * n, text=text)
    if unit == "m":
        return Duration(months=n, text=text)
    return Duration(days=n * (7 if unit == "w" else 1), text=text)


@dataclass(frozen=True)
class RuleMatch:
    """Conditions of one rule, all of which must hold (each a set of alternatives)."""

    accounts: frozenset[str] = frozenset()
    from_domains: frozenset[str] = frozenset()
    to_domains: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    queries: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionRule:
    name: str
    keep: Duration | None  # None = forever
    match: RuleMatch

    def describe_keep(self) -> str:
        return self.keep.text if self.keep else FOREVER


@dataclass(frozen=True)
class RetentionPolicy:
    rules: tuple[RetentionRule, ...]
    default: Duration | None  # None = keep forever
    batch_size: int = DEFAULT_BATCH_SIZE


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def _strings(value: Any, where: str, key: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"{where}: key {key!r}: expected a non-empty string or a list of "
                          "non-empty strings")
    return [v.strip() for v in items]


def _keep(value: Any, where: str, key: str) -> Duration | None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key {key!r}: expected a duration string such as \"7y\", "
                          f"\"90d\" or \"{FOREVER}\"")
    if value.strip() == FOREVER:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: key {key!r}: {exc}") from None


def _parse_match(data: Any, where: str) -> RuleMatch:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key 'match': expected a table such as "
                          "{ account = \"finance\" }")
    unknown = sorted(set(data) - set(MATCH_KEYS))
    if unknown:
        raise ConfigError(f"{where}: key 'match.{unknown[0]}': unknown key (known: "
                          f"{', '.join(MATCH_KEYS)})")
    if not data:
        raise ConfigError(f"{where}: key 'match': give at least one of "
                          f"{', '.join(MATCH_KEYS)} (the catch-all is [retention] default)")
    values = {k: _strings(v, where, f"match.{k}") for k, v in data.items()}
    for query in values.get("query", []):
        try:
            parse_query(query)
        except QuerySyntaxError as exc:
            raise ConfigError(f"{where}: key 'match.query': {exc}") from None
    for key in ("from_domain", "to_domain"):
        for domain in values.get(key, []):
            if "@" in domain.lstrip("@") or " " in domain:
                raise ConfigError(f"{where}: key 'match.{key}': {domain!r} is not a domain")
    for address in values.get("address", []):
        if address.count("@") != 1 or address.startswith("@") or address.endswith("@"):
            raise ConfigError(f"{where}: key 'match.address': {address!r} is not an address")

    def lowered(key: str) -> frozenset[str]:
        return frozenset(v.lower().lstrip("@") for v in values.get(key, []))

    return RuleMatch(accounts=frozenset(values.get("account", [])),
                     from_domains=lowered("from_domain"), to_domains=lowered("to_domain"),
                     addresses=lowered("address"), queries=tuple(values.get("query", [])))


def parse_retention(config: Config) -> RetentionPolicy | None:
    """The ``[retention]`` table as a policy; None when the file has none.

    Raises ConfigError naming the file, the rule and the key.
    """
    where = str(config.path) if config.path else "configuration"
    data = config.raw.get("retention")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [retention] must be a table")
    section = f"{where}: [retention]"
    unknown = sorted(set(data) - {"default", "keep_forever", "rules", "batch_size"})
    if unknown:
        raise ConfigError(f"{section}: key {unknown[0]!r}: unknown key (check the spelling)")
    forever = data.get("keep_forever", False)
    if not isinstance(forever, bool):
        raise ConfigError(f"{section}: key 'keep_forever': expected true or false")
    if forever and "default" in data:
        raise ConfigError(f"{section}: key 'default': give either default or "
                          "keep_forever = true, not both")
    if not forever and "default" not in data:
        raise ConfigError(f"{section}: key 'default': required (e.g. default = \"10y\"), or "
                          "set keep_forever = true to keep unmatched messages forever")
    default = None if forever else _keep(data["default"], section, "default")
    batch = data.get("batch_size", DEFAULT_BATCH_SIZE)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 0 < batch <= MAX_BATCH_SIZE:
        raise ConfigError(f"{section}: key 'batch_size': must be an integer from 1 to "
                          f"{MAX_BATCH_SIZE}")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{section}: key 'rules': use [[retention.rules]] tables")
    rules: list[RetentionRule] = []
    for i, raw in enumerate(raw_rules):
        entry = f"{where}: [[retention.rules]] entry {i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{entry}: must be a table")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{entry}: key 'name': required, a non-empty string")
        rule_where = f"{where}: [[retention.rules]] rule {name!r}"
        if name == DEFAULT_RULE or any(r.name == name for r in rules):
            raise ConfigError(f"{rule_where}: key 'name': already used; rule names must be "
                              "unique")
        unknown = sorted(set(raw) - {"name", "keep", "match"})
        if unknown:
            raise ConfigError(f"{rule_where}: key {unknown[0]!r}: unknown key (known: name, "
                              "keep, match)")
        if "keep" not in raw:
            raise ConfigError(f"{rule_where}: key 'keep': required (e.g. keep = \"7y\")")
        if "match" not in raw:
            raise ConfigError(f"{rule_where}: key 'match': required")
        rules.append(RetentionRule(name=name, keep=_keep(raw["keep"], rule_where, "keep"),
                                   match=_parse_match(raw["match"], rule_where)))
    return RetentionPolicy(rules=tuple(rules), default=default, batch_size=batch)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def parse_timestamp(value: str | None) -> dt.datetime | None:
    """``@timestamp`` as an aware UTC datetime (naive = UTC), or None if absent/unreadable."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


def rule_matches(match: RuleMatch, doc: DocInfo, query_hits: Mapping[str, set[str]]) -> bool:
    """Whether ``doc`` satisfies every condition; ``query_hits`` maps query text to the keys
    the sink returned for it."""
    if match.accounts and not match.accounts.intersection(doc.accounts):
        return False
    if match.from_domains and not any(a.rpartition("@")[2] in match.from_domains
                                      for a in doc.from_addresses):
        return False
    if match.to_domains and not any(a.rpartition("@")[2] in match.to_domains
                                    for a in doc.to_addresses):
        return False
    if match.addresses and not match.addresses.intersection(
            (*doc.from_addresses, *doc.to_addresses)):
        return False
    return all(doc.message_key in query_hits[q] for q in match.queries)


def first_rule(policy: RetentionPolicy, doc: DocInfo,
               query_hits: Mapping[str, set[str]]) -> tuple[str, Duration | None]:
    """The name and period of the first matching rule, else the default."""
    for rule in policy.rules:
        if rule_matches(rule.match, doc, query_hits):
            return rule.name, rule.keep
    return DEFAULT_RULE, policy.default


@dataclass
class RuleTally:
    """Per rule: messages it governs, how many expired, how many of those a hold kept."""

    rule: str
    keep: str
    matched: int = 0
    expired: int = 0
    held: int = 0
    oldest: str | None = None  # @timestamp range of the expired (not held) messages
    newest: str | None = None
    _oldest_at: dt.datetime | None = field(default=None, repr=False)
    _newest_at: dt.datetime | None = field(default=None, repr=False)

    def add_expired(self, stamp: str, when: dt.datetime) -> None:
        self.expired += 1
        if self._oldest_at is None or when < self._oldest_at:
            self._oldest_at, self.oldest = when, stamp
        if self._newest_at is None or when > self._newest_at:
            self._newest_at, self.newest = when, stamp

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "keep": self.keep, "matched": self.matched,
                "expired": self.expired, "held": self.held, "oldest": self.oldest,
                "newest": self.newest}


@dataclass
class Expiring:
    doc: DocInfo
    rule: str


@dataclass
class RetentionPlan:
    """What ``apply`` would do now (``expiring``), with counts per rule."""

    now: str
    tallies: list[RuleTally]
    expiring: list[Expiring] = field(default_factory=list)
    held_keys: dict[str, list[str]] = field(default_factory=dict)  # expired but held: holds
    holds: list[str] = field(default_factory=list)  # active hold names
    documents: int = 0
    undated: int = 0

    @property
    def expired(self) -> int:
        return len(self.expiring)

    @property
    def held(self) -> int:
        return len(self.held_keys)

    def keys(self) -> list[str]:
        return [e.doc.message_key for e in self.expiring]

    def to_dict(self) -> dict[str, Any]:
        return {"now": self.now, "documents": self.documents, "expired": self.expired,
                "held": self.held, "undated": self.undated, "holds": self.holds,
                "message_keys_sha256": keys_digest(self.keys()),
                "rules": [t.to_dict() for t in self.tallies]}


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def plan_retention(policy: RetentionPolicy, lifecycle: Lifecycle, holds: Sequence[Hold], *,
                   now: dt.datetime | None = None) -> RetentionPlan:
    """Evaluate every document against the rules and the active holds (one scan, plus one
    query per distinct rule or hold query)."""
    now = now or dt.datetime.now(dt.UTC)
    queries = list(dict.fromkeys(q for r in policy.rules for q in r.match.queries))
    query_hits = {q: lifecycle.match_keys(q) for q in queries}
    held_by: dict[str, list[str]] = {}
    for hold in holds:
        for key in lifecycle.match_keys(hold.query):
            held_by.setdefault(key, []).append(hold.name)
    tallies = {r.name: RuleTally(r.name, r.describe_keep()) for r in policy.rules}
    tallies[DEFAULT_RULE] = RuleTally(DEFAULT_RULE,
                                      policy.default.text if policy.default else FOREVER)
    plan = RetentionPlan(now=_iso(now), tallies=list(tallies.values()),
                         holds=[h.name for h in holds])
    for doc in lifecycle.iter_docs():
        plan.documents += 1
        name, keep = first_rule(policy, doc, query_hits)
        tally = tallies[name]
        tally.matched += 1
        when = parse_timestamp(doc.timestamp)
        if when is None:
            plan.undated += 1
            continue
        if keep is None or keep.after(when) > now:
            continue
        if doc.message_key in held_by:
            tally.held += 1
            plan.held_keys[doc.message_key] = held_by[doc.message_key]
            continue
        tally.add_expired(doc.timestamp or "", when)
        plan.expiring.append(Expiring(doc, name))
    return plan


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------


@dataclass
class ApplyReport:
    plan: RetentionPlan
    documents_deleted: int = 0
    receipts_expired: int = 0
    raw_deleted: int = 0
    batches: int = 0
    audit_seqs: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "documents_deleted": self.documents_deleted,
                "receipts_expired": self.receipts_expired, "raw_deleted": self.raw_deleted,
                "batches": self.batches, "audit_seqs": self.audit_seqs}


def run_lock(archive_path: Path) -> contextlib.AbstractContextManager[None]:
    """One retention run per archive at a time; a second one fails at once (ArchiveError)."""
    path = Path(archive_path) / LOCK_FILE
    return exclusive_lock(path, busy=f"another retention run holds {path}; try again when it "
                                     "has finished")


def _chunks(items: Sequence[Expiring], size: int) -> Iterator[Sequence[Expiring]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def apply_retention(policy: RetentionPolicy, sink: Any, store: RawStore, archive_path: Path,
                    *, actor: str | None = None, now: dt.datetime | None = None,
                    ) -> ApplyReport:
    """Expire what :func:`plan_retention` finds (see the module docstring for the order)."""
    lifecycle = lifecycle_for(sink)
    audit = AuditLog(archive_path)
    who = actor or default_actor()
    with run_lock(archive_path):
        holds = HoldStore(archive_path).active()
        plan = plan_retention(policy, lifecycle, holds, now=now)
        report = ApplyReport(plan)
        receipts = receipts_by_key(lifecycle.iter_receipts())
        for batch in _chunks(plan.expiring, policy.batch_size):
            keys = [e.doc.message_key for e in batch]
            batch_receipts = [r for k in keys for r in receipts.get(k, [])
                              if r.status is not ReceiptStatus.EXPIRED]
            rules: dict[str, int] = {}
            for e in batch:
                rules[e.rule] = rules.get(e.rule, 0) + 1
            entry = audit.append(
                Action.RETENTION_APPLY,
                what={**keys_summary(keys), "receipts": len(batch_receipts)},
                why={"rules": rules, "now": plan.now}, actor=who)
            report.audit_seqs.append(entry.seq)
            note = f"expired {plan.now} by retention (audit seq {entry.seq})"
            lifecycle.expire_receipts(batch_receipts, note)
            report.receipts_expired += len(batch_receipts)
            report.documents_deleted += lifecycle.delete_documents([e.doc for e in batch])
            report.batches += 1
        lifecycle.refresh()
        candidates = {e.doc.raw_sha256 for e in plan.expiring if e.doc.raw_sha256}
        candidates |= {r.raw_sha256 for rs in receipts.values() for r in rs
                       if r.status is ReceiptStatus.EXPIRED}
        candidates |= {r.raw_sha256 for e in plan.expiring
                       for r in receipts.get(e.doc.message_key, [])}
        deleted = _collect_raw(candidates, lifecycle, store)
        report.raw_deleted = len(deleted)
        if deleted:
            entry = audit.append(Action.RETENTION_APPLY,
                                 what=keys_summary(deleted, label="raw_sha256"),
                                 why={"reason": "raw objects no longer referenced by any "
                                                "document or unexpired receipt",
                                      "now": plan.now}, actor=who)
            report.audit_seqs.append(entry.seq)
    return report


def _collect_raw(candidates: set[str], lifecycle: Lifecycle, store: RawStore) -> list[str]:
    """Delete the candidates nothing still refers to; references are read fresh, after the
    deletions, across every document and every receipt not expired."""
    if not candidates:
        return []
    referenced = {d.raw_sha256 for d in lifecycle.iter_docs() if d.raw_sha256}
    referenced |= {r.raw_sha256 for r in lifecycle.iter_receipts()
                   if r.status is not ReceiptStatus.EXPIRED}
    deleted: list[str] = []
    for sha in sorted(candidates - referenced):
        if store.delete(sha):
            deleted.append(sha)
    return deleted


def run_scheduled(config: Config) -> dict[str, Any]:
    """What the daily Celery beat task calls: apply the configured policy, if any.

    Returns a JSON-safe summary for the worker log; ``{"status": "not_configured"}`` when the
    file has no ``[retention]``.
    """
    from ingest.archive import open_store
    from ingest.sinks.factory import open_sink

    policy = parse_retention(config)
    if policy is None:
        return {"status": "not_configured"}
    sink = open_sink(config)
    try:
        sink.ensure_schema()
        report = apply_retention(policy, sink, open_store(config),
                                 config.archive_path, actor=SCHEDULED_ACTOR)
    finally:
        sink.close()
    return {"status": "applied", **report.to_dict()}
