"""App F's tagging instruction and the parser of its replies: balanced-brace JSON, the schema, one repair."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# App F, verbatim
INSTRUCTION = """You are a tagging engine. Return ONLY a JSON object with fields:
{
  "caption": str,
  "objects": [str],
  "attributes": [str],
  "styles": [str],
  "colors": [str]
}.
Rules: lowercase; <=10 items total; no nulls."""

LIST_FIELDS = ("objects", "attributes", "styles", "colors")
MAX_ITEMS = 10  # "<=10 items total", over the four lists, kept in field order
PARSER_VERSION = 1


@dataclass
class Parsed:
    """One reply: status ok | repaired | failed, the reason (first error), the tags, items cut by the limit."""

    status: str
    reason: str = ""
    caption: str = ""
    lists: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in LIST_FIELDS})
    n_truncated: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class _Scanner:
    """Walks JSON text and tells which characters lie outside strings (escapes respected)."""

    def __init__(self):
        self.in_str, self.escaped = False, False

    def outside(self, c: str) -> bool:
        """Feed one character; True when it is structure (not part of a string, quotes excluded)."""
        if self.in_str:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_str = False
            return False
        self.in_str = c == '"'
        return not self.in_str


def balanced_object(text: str) -> str | None:
    """The first {...} of `text` whose braces balance outside strings; from the first '{' to the end if none
    closes; None without a '{'."""
    start = text.find("{")
    if start < 0:
        return None
    depth, scan = 0, _Scanner()
    for i in range(start, len(text)):
        if scan.outside(text[i]) and text[i] in "{}":
            depth += 1 if text[i] == "{" else -1
            if depth == 0:
                return text[start:i + 1]
    return text[start:]


def _reason(exc: json.JSONDecodeError) -> str:
    return exc.msg  # e.g. "Expecting ',' delimiter", "Unterminated string starting at", "Extra data"


def _close(text: str) -> str:
    """`text` (a reply cut by max_new_tokens) with an open string dropped (a cut word is no tag; a key left
    without value goes too) and open brackets closed, in order."""
    stack, scan, opened = [], _Scanner(), 0
    for i, c in enumerate(text):
        was_in = scan.in_str
        if scan.outside(c) and c in "[{]}":
            if c in "[{":
                stack.append((i, "]" if c == "[" else "}"))
            elif stack:
                stack.pop()
        if scan.in_str and not was_in:
            opened = i
    if scan.in_str:
        text = text[:opened]
    text = re.sub(r'(,\s*)?("[^"]*"\s*:\s*)?$', "", text.rstrip())  # a key left without its value
    stack = [s for s in stack if s[0] < len(text)]
    return text + "".join(close for _, close in reversed(stack))


def repair(text: str) -> str:
    """One repair pass: curly quotes, missing commas between strings, trailing commas, then close what is open."""
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r'"\s*\n\s*"', '", "', text)  # items on separate lines without commas
    text = re.sub(r'"(\s+)"', r'",\1"', text)
    text = _close(text.rstrip().rstrip(","))
    return re.sub(r",\s*([\]}])", r"\1", text)


def validate(obj) -> Parsed:
    """Schema check: caption a non-empty str, the lists lists of str (missing = empty); lowercase, deduplicated,
    at most MAX_ITEMS items over the four lists (the rest cut and counted). A violation fails with its field."""
    if not isinstance(obj, dict):
        return Parsed("failed", f"schema violation: a JSON {type(obj).__name__}, not an object")
    cap = obj.get("caption")
    if not isinstance(cap, str) or not cap.strip():
        what = "missing" if "caption" not in obj else "null" if cap is None else "not a non-empty str"
        return Parsed("failed", f"schema violation: caption is {what}")
    lists, budget, cut = {}, MAX_ITEMS, 0
    for f in LIST_FIELDS:
        v = obj.get(f, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            what = "null" if v is None else "not a list of str"
            return Parsed("failed", f"schema violation: {f} is {what}")
        items = list(dict.fromkeys(x.strip().lower() for x in v if x.strip()))
        lists[f], cut = items[:budget], cut + max(0, len(items) - budget)
        budget -= len(lists[f])
    return Parsed("ok", caption=cap.strip().lower(), lists=lists, n_truncated=cut)


def parse_reply(text: str) -> Parsed:
    """Parse one reply: the first balanced JSON object, validated; on a JSON error one `repair` attempt
    (status "repaired", the first error kept as reason); else failed with the reason."""
    if not text or not text.strip():
        return Parsed("failed", "empty")
    candidate = balanced_object(text)
    if candidate is None:
        return Parsed("failed", "no JSON object")
    try:
        return validate(json.loads(candidate))
    except json.JSONDecodeError as exc:
        first = _reason(exc)
    try:
        out = validate(json.loads(repair(candidate)))
    except json.JSONDecodeError:
        return Parsed("failed", first)
    if not out.ok:
        return Parsed("failed", first)  # the JSON error is the cause, not what the repair left
    out.status, out.reason = "repaired", first
    return out


def reference_parse(text: str) -> str:
    """What the reference's parser makes of a reply: "" if it parses, else json's error (greedy \\{.*\\} + loads)."""
    m = re.search(r"\{.*\}", text, re.S)
    if m is None:
        return "no JSON object"
    try:
        json.loads(m.group(0))
        return ""
    except json.JSONDecodeError as exc:
        return _reason(exc)
