"""The metric names a PromQL expression reads, by PromQL's own lexical rules: strings,
label matchers (`{...}`), ranges and subqueries (`[...]`), numbers and durations, and
Grafana's `$variables` are skipped; an identifier followed by `(` is a function; the
aggregation operators and keywords are not metrics; the label lists after `by`,
`without`, `on`, `ignoring`, `group_left` and `group_right` are labels."""

from __future__ import annotations

import re

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "atan2", "inf", "nan", "start", "end"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<open>[{\[(]) | (?P<close>[}\])])
  | (?P<op>[-+*/%^=!<>~,@]+)
""", re.VERBOSE)


class PromQLError(ValueError):
    """The expression cannot be read (an unknown character or unbalanced brackets)."""


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup not in ("space", "comment"):
            out.append((m.lastgroup or "", m.group()))
    return out


def metric_names(expr: str) -> set[str]:
    toks = tokens(expr)
    names: set[str] = set()
    depth: list[str] = []  # open brackets; names inside {} and [] and label lists are not metrics
    label_list_at: int | None = None
    for i, (kind, text) in enumerate(toks):
        if kind == "open":
            if text == "(" and i > 0 and toks[i - 1] == ("ident", toks[i - 1][1]) and toks[i - 1][1] in LABEL_LISTS:
                label_list_at = len(depth)
            depth.append(text)
        elif kind == "close":
            if not depth or {"}": "{", "]": "[", ")": "("}[text] != depth[-1]:
                raise PromQLError(f"unbalanced {text!r} in {expr!r}")
            depth.pop()
            if label_list_at is not None and len(depth) == label_list_at:
                label_list_at = None
        elif kind == "ident" and not any(b in "{[" for b in depth) and label_list_at is None:
            following = toks[i + 1][1] if i + 1 < len(toks) else ""
            if following != "(" and text not in AGGREGATIONS and text not in KEYWORDS:
                names.add(text)
    if depth:
        raise PromQLError(f"unclosed {depth[-1]!r} in {expr!r}")
    return names
