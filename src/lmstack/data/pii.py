"""Personal data scrubbed from text before it becomes training data (phase=harvest).

Built-in rules, each replacing a match with its name in brackets ("[email]"):
- email: an address with a dotted domain;
- phone: international numbers written with a leading +, and North-American style
  (555) 123-4567 / 555-123-4567 / 555.123.4567; bare runs of digits are left alone, so
  numbers in prompts (sums, years, ids) survive;
- api_key: the shapes of common provider keys (sk-..., AKIA..., ghp_..., xox?-..., AIza...)
  and long bearer tokens after "Bearer ".
Teams add or replace rules by name (harvest.pii_rules); the counts of what each rule
replaced go into the data card.
"""

from __future__ import annotations

import re
from collections import Counter

BUILTIN_RULES = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": (
        r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
        r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)"
    ),
    "api_key": (
        r"\b(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{30,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,})"
        r"|(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"
    ),
}


class Scrubber:
    """Applies the rules in order, counting the matches each replaced."""

    def __init__(self, extra_rules: dict[str, str] | None = None) -> None:
        rules = BUILTIN_RULES | (extra_rules or {})
        self.rules = [(name, re.compile(pattern)) for name, pattern in rules.items() if pattern]
        self.counts: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        for name, pattern in self.rules:
            text, replaced = pattern.subn(f"[{name}]", text)
            self.counts[name] += replaced
        return text
