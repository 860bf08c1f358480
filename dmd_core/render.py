"""User text (prompts, paths, config values, names) rendered as data: in markdown, in Python code, on a terminal.

Prompt sets are scraped text and paths hold any byte but NUL, so whatever a user or a data set wrote reaches
a model card, a dashboard or a terminal only through these: it can neither open markup (HTML, links,
headings, code fences), nor become code, nor move the cursor.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 (0x9b alone starts an ANSI sequence), the marks and overrides
# that reorder what is shown (bidi), Unicode's line separators, and lone surrogates (not encodable as UTF-8).
_UNSAFE_CHARS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff"
_UNSAFE = re.compile(f"[{_UNSAFE_CHARS}]")
_UNSAFE_OR_BREAK = re.compile(f"[{_UNSAFE_CHARS}\t\n]")  # and the tab and newline, for one line
# inline markdown: escapes, code, emphasis, links, table cells, strikethrough; &, <, > become entities
_MD_INLINE = re.compile(r"([\\`*_\[\]|~])")
_HTML = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})
_LIST_NUMBER = re.compile(r"\d{1,9}(?=[.)])")


def one_line(value: object, limit: int | None = None) -> str:
    """``value`` as one line of plain text: control and layout characters become spaces, runs of white space
    one space, cut to ``limit`` characters (cut first, so a megabyte costs no more than ``limit``)."""
    return " ".join(_UNSAFE_OR_BREAK.sub(" ", _cut(str(value), limit)).split())


def md_text(value: object, limit: int | None = None) -> str:
    """``value`` as literal markdown text on one line (a table cell, a link's text): nothing in it is markup."""
    text = _MD_INLINE.sub(r"\\\1", one_line(value, limit)).translate(_HTML)
    if m := _LIST_NUMBER.match(text):  # "1." or "1)" opens a list at the start of a line
        return text[: m.end()] + "\\" + text[m.end() :]
    return "\\" + text if text[:1] in ("#", "+", "-", "=") else text  # heading, list, setext underline


def md_code(value: object, limit: int | None = None, cell: bool = False) -> str:
    """``value`` as an inline code span on one line, its fence longer than any backtick run inside.
    ``cell``: inside a table, where a ``|`` ends the cell even in code, such a value is text instead."""
    text = _UNSAFE_OR_BREAK.sub(" ", _cut(str(value), limit))
    if cell and "|" in text:
        return md_text(text)
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if not text or text[0] in "` " or text[-1] in "` " else ""  # CommonMark strips one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def md_fenced(text: str, info: str = "") -> str:
    """``text`` as a fenced code block: the fence is longer than any backtick run inside, so no line closes it.
    ``info`` (the language) is ours, never user text."""
    body = _UNSAFE.sub("\ufffd", re.sub(r"\r\n?", "\n", text)).rstrip("\n")
    fence = "`" * max(3, _longest_backtick_run(body) + 1)
    return f"{fence}{info}\n{body}\n{fence}\n"


def py_literal(value: object) -> str:
    """``value`` as a Python string literal that evaluates to it (quotes, newlines, controls escaped)."""
    return repr(str(value))


def terminal_text(text: str, newlines: bool = True) -> str:
    """``text`` safe to print on a terminal: control characters (ESC, CR, BEL, C1, bidi overrides) shown
    escaped, as ``\\x1b``; tab and, with ``newlines``, newline kept."""
    return (_UNSAFE if newlines else _UNSAFE_OR_BREAK).sub(_escaped, text)


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _escaped(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)
