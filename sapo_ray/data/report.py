"""What loading a dataset kept and skipped: `data_report.json` in the run directory."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Skipped rows listed one by one (file, row, reason, detail); the counts by reason are always complete.
MAX_LISTED = 1000


class SkipRow(ValueError):
    """A row that cannot be used, and why (`reason` is the key it is counted under)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class DataReport:
    rows: int = 0  # rows read
    used: int = 0  # rows that became Examples
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    skipped_rows: list[dict] = field(default_factory=list)  # the first MAX_LISTED, with file and row

    def skip(self, file: str, row: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.skipped_rows) < MAX_LISTED:
            self.skipped_rows.append({"file": file, "row": row, "reason": reason, "detail": detail})

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) or "none"
        return f"{self.used} of {self.rows} rows used; skipped: {reasons}"

    def as_dict(self) -> dict:
        return {"rows": self.rows, "used": self.used, "skipped": dict(self.skipped), "skipped_rows": self.skipped_rows}
