"""``export.promote_if``: the quality gate's small expression language, parsed here (never by ``eval``).

An expression compares evaluate's metrics (``fd_ratio``, ``student_class_accuracy``, ``speedup``, ...) with
``promoted``, the same metric of the last promoted export of the same teacher and pipeline, e.g.
``fd_ratio <= 1.1 * promoted and speedup >= 0.9 * promoted``: numbers, metric names, ``promoted`` /
``promoted.<metric>``, ``+ - * /``, parentheses, one comparison (``< <= > >= == !=``) per operand of
``and`` / ``or`` / ``not``. In a comparison, a bare ``promoted`` is the promoted value of the one metric that
comparison names. config.py validates the setting with ``parse``; stages/promotion.py applies it.
"""

from __future__ import annotations

import math
import re

from dmd_core.errors import InputError, shown

# evaluate's numeric metrics (stages/evaluate: metrics.json); a name outside these is refused up front
METRICS = (
    "teacher_fd", "student_fd", "fd_ratio", "teacher_class_accuracy", "student_class_accuracy", "teacher_nfe", "student_nfe",
    "teacher_clip_score", "student_clip_score", "teacher_images_per_s", "student_images_per_s", "speedup", "distill_steps",
)  # fmt: skip
MAX_TEXT = 500  # characters of an expression
MAX_DEPTH = 32  # nesting of parentheses, unary minus and not
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
EXAMPLE = "fd_ratio <= 1.1 * promoted"

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op><=|>=|==|!=|[<>+\-*/().]))")
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")
_WORDS = ("and", "or", "not", "promoted")


class Rule:
    """A parsed ``promote_if``: ``check(metrics, promoted)`` -> (passes, the comparisons with their values)."""

    def __init__(self, text: str, tree: tuple):
        self.text, self.tree = text, tree

    def __repr__(self) -> str:
        return f"Rule({self.text!r})"

    def metrics(self) -> set[str]:
        """Every metric the rule reads (of this run and of the promoted export)."""
        found: set[str] = set()

        def walk(n: tuple) -> None:
            if n[0] in ("metric", "promoted"):
                found.add(n[1])
            for c in n[1:]:
                if isinstance(c, tuple):
                    walk(c)

        walk(self.tree)
        return found

    def check(self, metrics: dict, promoted: dict) -> tuple[bool, list[str]]:
        """Whether ``metrics`` pass against the promoted export's ``promoted`` metrics, and each comparison
        written out with its values (``fd_ratio 0.92 <= 1.1 * promoted 0.85 = 0.935: yes``)."""
        shown_: list[str] = []
        return bool(_value(self.tree, metrics, promoted, shown_)), shown_


def parse(text: str) -> Rule:
    """Parse ``text`` into a Rule; InputError naming the problem and the fix."""

    def refuse(problem: str) -> InputError:
        detail = (
            f"{problem}. Fix: write a comparison of evaluate metrics ({', '.join(METRICS[:3])}, ...) with promoted, "
            f"e.g. {EXAMPLE!r}, joined by and/or (null: always promote)"
        )
        e = InputError(f"export.promote_if {shown(text, 120)}: {detail}.")
        e.detail = detail  # config validation names the setting and the value itself
        return e

    if not isinstance(text, str) or not text.strip():
        raise refuse("empty")
    if len(text) > MAX_TEXT:
        raise refuse(f"longer than {MAX_TEXT} characters")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            j = len(text) - len(text[pos:].lstrip())
            raise refuse(f"unexpected {text[j]!r} at character {j + 1}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    tokens.append(("end", ""))
    at = 0

    def peek() -> tuple[str, str]:
        return tokens[at]

    def take(value: str | None = None) -> tuple[str, str]:
        nonlocal at
        tok = tokens[at]
        if value is not None and tok[1] != value:
            raise refuse(f"expected {value!r}, found {tok[1] or 'the end'!r}")
        at += 1
        return tok

    def word(w: str) -> bool:
        return peek() == ("name", w)

    def disjunction(depth: int) -> tuple:
        node = conjunction(depth)
        while word("or"):
            take()
            node = ("or", node, conjunction(depth))
        return node

    def conjunction(depth: int) -> tuple:
        node = negation(depth)
        while word("and"):
            take()
            node = ("and", node, negation(depth))
        return node

    def negation(depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise refuse(f"nested deeper than {MAX_DEPTH}")
        if word("not"):
            take()
            return ("not", negation(depth + 1))
        if peek()[1] == "(" and _is_condition(at):
            take("(")
            node = disjunction(depth + 1)
            take(")")
            return node
        return comparison(depth)

    def _is_condition(start: int) -> bool:
        """Whether the parenthesis at ``start`` encloses a condition (holds a comparison or and/or/not at its own level)."""
        level = 0
        for kind, value in tokens[start:]:
            if value == "(":
                level += 1
            elif value == ")":
                level -= 1
                if level == 0:
                    return False
            elif level == 1 and (value in _COMPARE or (kind == "name" and value in ("and", "or", "not"))):
                return True
        return False

    def comparison(depth: int) -> tuple:
        left = sum_(depth)
        op = peek()[1]
        if op not in _COMPARE:
            raise refuse(f"expected a comparison ({', '.join(_COMPARE)}) after {_text(left)!r}, found {op or 'the end'!r}")
        take()
        right = sum_(depth)
        if peek()[1] in _COMPARE:
            raise refuse("chained comparison; join two comparisons with and")
        return _bind_promoted(("cmp", op, left, right), refuse)

    def sum_(depth: int) -> tuple:
        node = product(depth)
        while peek()[1] in ("+", "-"):
            node = ("arith", take()[1], node, product(depth))
        return node

    def product(depth: int) -> tuple:
        node = unary(depth)
        while peek()[1] in ("*", "/"):
            node = ("arith", take()[1], node, unary(depth))
        return node

    def unary(depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise refuse(f"nested deeper than {MAX_DEPTH}")
        if peek()[1] == "-":
            take()
            return ("neg", unary(depth + 1))
        return atom(depth)

    def atom(depth: int) -> tuple:
        kind, value = take()
        if kind == "num":
            v = float(value)
            if not math.isfinite(v):
                raise refuse(f"number {value} is not finite")
            return ("num", v)
        if value == "(":
            node = sum_(depth + 1)
            take(")")
            return node
        if kind == "name" and value == "promoted":
            if peek()[1] == ".":
                take()
                k, name = take()
                if k != "name" or name not in METRICS:
                    raise refuse(f"promoted.{name}: no such metric (known: {', '.join(METRICS)})")
                return ("promoted", name)
            return ("promoted", None)
        if kind == "name" and value not in _WORDS:
            if value not in METRICS:
                raise refuse(f"unknown metric {value!r} (known: {', '.join(METRICS)})")
            return ("metric", value)
        raise refuse(f"expected a number, a metric or promoted, found {value or 'the end'!r}")

    tree = disjunction(0)
    if peek()[0] != "end":
        raise refuse(f"unexpected {peek()[1]!r} after a complete condition")
    return Rule(text, tree)


def _bind_promoted(node: tuple, refuse) -> tuple:
    """A bare ``promoted`` in a comparison is the promoted value of the one metric the comparison names."""
    names: set[str] = set()
    bare = [False]

    def walk(n: tuple) -> None:
        if n[0] == "metric":
            names.add(n[1])
        elif n[0] == "promoted" and n[1] is None:
            bare[0] = True
        for c in n[1:]:
            if isinstance(c, tuple):
                walk(c)

    walk(node)
    if not bare[0]:
        return node
    if len(names) != 1:
        raise refuse(f"{_text(node)!r}: a bare promoted needs exactly one metric in its comparison; write promoted.<metric>")
    name = names.pop()

    def bind(n: tuple) -> tuple:
        if n == ("promoted", None):
            return ("promoted", name)
        return tuple(bind(c) if isinstance(c, tuple) else c for c in n)

    return bind(node)


def _text(n: tuple) -> str:
    kind = n[0]
    if kind == "num":
        return f"{n[1]:g}"
    if kind == "metric":
        return n[1]
    if kind == "promoted":
        return "promoted" if n[1] is None else f"promoted.{n[1]}"
    if kind == "neg":
        return f"-{_text(n[1])}"
    if kind in ("arith", "cmp"):
        return f"{_text(n[2])} {n[1]} {_text(n[3])}"
    if kind == "not":
        return f"not ({_text(n[1])})"
    return f"({_text(n[1])}) {kind} ({_text(n[2])})"


def _side(n: tuple, v: float) -> str:
    return _text(n) if n[0] == "num" else f"{_text(n)} ({v:.6g})"


def _number(metrics: dict, name: str, whose: str) -> float:
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(
            f"export.promote_if reads {name}, which {whose} has no finite value for ({shown(v)}). "
            f"Fix: compare metrics this evaluation measures (e.g. {EXAMPLE!r})."
        )
    return float(v)


def _value(n: tuple, metrics: dict, promoted: dict, shown_: list[str]):
    kind = n[0]
    if kind == "num":
        return n[1]
    if kind == "metric":
        return _number(metrics, n[1], "this run")
    if kind == "promoted":
        return _number(promoted, n[1], "the promoted export")
    if kind == "neg":
        return -_value(n[1], metrics, promoted, shown_)
    if kind == "arith":
        a, b = _value(n[2], metrics, promoted, shown_), _value(n[3], metrics, promoted, shown_)
        if n[1] == "/":
            return a / b if b != 0 else math.copysign(math.inf, a) if a != 0 else math.nan
        return a + b if n[1] == "+" else a - b if n[1] == "-" else a * b
    if kind == "cmp":
        a, b = _value(n[2], metrics, promoted, shown_), _value(n[3], metrics, promoted, shown_)
        ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[n[1]]
        shown_.append(f"{_side(n[2], a)} {n[1]} {_side(n[3], b)}: {'yes' if ok else 'no'}")
        return ok
    if kind == "not":
        return not _value(n[1], metrics, promoted, shown_)
    if kind == "and":  # both sides evaluated: the reason lists every comparison
        a, b = _value(n[1], metrics, promoted, shown_), _value(n[2], metrics, promoted, shown_)
        return a and b
    a, b = _value(n[1], metrics, promoted, shown_), _value(n[2], metrics, promoted, shown_)
    return a or b
