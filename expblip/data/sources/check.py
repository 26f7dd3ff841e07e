"""A conversion's dry run (``make_shards SOURCE --check [N]``): read the first N rows, write nothing, judge.

    report = check(ConvertRequest("table", out="", table_options=TableOptions(table="faces.csv")), rows=100)
    print("\\n".join(report.lines()))     # usable rows, each kind of skipped row, three example records
    report.error                          # None, or why the conversion would fail (naming the column / file / fix)

Any source works (they all yield records and count their skips in a :class:`~._common.Skips`, collected here with
``watch_skips``); the table source reads exactly N rows and counts bad labels instead of stopping at the first
(``lenient``). The verdict is the conversion's own rule: no usable row, more bad rows than ``--max-skipped``, or any
bad label fails.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from expblip.data.sources._common import Skips, watch_skips
from expblip.data.sources.convert import ConvertRequest, source_records

EXAMPLES = 3  # records shown as they would be written
FIRST_BAD = 5  # bad rows named
REPORTED = ("missing image", "unreadable image", "unknown AU number", "unknown emotion", "no label")  # always shown


@dataclass
class CheckReport:
    """What a check found: rows read, usable records, skipped rows by reason, bad labels, example records."""

    source: str
    limit: int | None  # rows asked for (None: all)
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad data by reason (counts against --max-skipped)
    dropped: Counter = field(default_factory=Counter)  # left out by a dataset's label rule
    bad_labels: Counter = field(default_factory=Counter)  # rows the conversion would stop at, by reason
    first_bad: list[str] = field(default_factory=list)  # the first bad rows, each "detail (reason)" or a message
    examples: list[dict] = field(default_factory=list)  # {"key", "labels", "caption"} as they would be written
    error: str | None = None  # why the conversion would fail; None when it would succeed

    @property
    def rows(self) -> int:
        return self.usable + self.skipped.total() + self.dropped.total() + self.bad_labels.total()

    def lines(self) -> list[str]:
        """The report as printed: counts (the REPORTED kinds always, others when found), then the examples."""
        scope = f"first {self.limit} rows" if self.limit else "all rows"
        out = [f"[expblip] check of {self.source} ({scope}, nothing written): {self.usable} usable of {self.rows} "
               "rows read"]
        counts = self.skipped + self.bad_labels
        out += [f"  {reason}: {counts[reason]}" for reason in REPORTED]
        out += [f"  {reason}: {n}" for reason, n in sorted(counts.items()) if reason not in REPORTED]
        out += [f"  {reason} (left out by rule): {n}" for reason, n in sorted(self.dropped.items())]
        out += [f"  first bad row: {row}" for row in self.first_bad]
        for i, example in enumerate(self.examples, 1):
            labels = json.dumps(example["labels"], sort_keys=True, ensure_ascii=False)
            out.append(f"  example {i}: key={example['key']} labels={labels} caption={example['caption']!r}")
        return out


def _example(record: dict) -> dict:
    captions = [str(c) for c in record.get("captions") or []]
    return {"key": record["key"], "labels": dict(record.get("labels") or {}), "caption": captions[0] if captions
            else None}


def _read(req: ConvertRequest, report: CheckReport, found: list[Skips]) -> None:
    """Read up to ``report.limit`` rows into ``report``; a source's own error propagates."""
    # sources that read no table ignore limit and lenient
    source = source_records(req, max_skipped=None, limit=report.limit, lenient=True)
    for record in source:
        report.usable += 1
        if len(report.examples) < EXAMPLES:
            report.examples.append(_example(record))
        seen = report.usable + sum(s.counts.total() + s.dropped.total() + s.errors.total() for s in found)
        if report.limit and seen >= report.limit:
            return


def _gather(report: CheckReport, found: list[Skips]) -> None:
    for skips in found:
        report.skipped += skips.counts
        report.dropped += skips.dropped
        report.bad_labels += skips.errors
    report.first_bad = [row for s in found for row in s.error_examples] + [row for s in found for row in s.examples]
    del report.first_bad[FIRST_BAD:]


def verdict(report: CheckReport, max_skipped: float) -> str | None:
    """Why the conversion would fail (the same rule as Skips.finish, plus any bad label), or None."""
    if report.bad_labels:
        kinds = ", ".join(f"{n} {reason}" for reason, n in sorted(report.bad_labels.items()))
        return f"{report.source}: the conversion would stop at a bad label ({kinds}); first: {report.first_bad[0]}"
    if report.usable == 0:
        return (f"{report.source}: no usable row among {report.rows} read; first bad rows: "
                f"{'; '.join(report.first_bad) or 'none'}. Check the image paths (--root) and the label columns")
    bad = report.skipped.total()
    if bad > max_skipped * report.rows:
        return (f"{report.source}: {bad} of {report.rows} rows skipped ({bad / report.rows:.1%}), more than "
                f"--max-skipped {max_skipped:.1%}; first: {'; '.join(report.first_bad)}. Fix the paths, or pass "
                f"--max-skipped {bad / report.rows:.2f} if these rows really lack images")
    return None


def check(req: ConvertRequest, rows: int | None = None) -> CheckReport:
    """Read the first ``rows`` rows (None or 0: all) of ``req``'s source as the conversion would; write nothing."""
    report = CheckReport(req.source, rows or None)
    with watch_skips() as found:
        try:
            _read(req, report, found)
        except (OSError, ValueError) as err:  # a missing table, a misnamed column, a refused layout
            report.error = str(err)
    _gather(report, found)
    report.error = report.error or verdict(report, req.max_skipped)
    return report
