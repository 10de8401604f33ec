"""``--help`` text from module docstrings, as plain text for a terminal.

The docstrings are written for readers of the source (Sphinx roles, double backticks); a
command's ``--help`` prints the same sentences without that markup. Every parser whose
description comes from a docstring builds it with :func:`doc_help`, the one place the markup is
stripped.
"""

from __future__ import annotations

import re

# :mod:`x`, :func:`~pkg.mod.f`, :class:`title <pkg.Class>`, :pep:`562`
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
_LITERAL = re.compile(r"``(.+?)``", re.S)
_STRONG = re.compile(r"\*\*(.+?)\*\*", re.S)


def _role_text(match: re.Match) -> str:
    target = match.group(1)
    titled = _TITLED.match(target)
    if titled:
        return titled.group(1)
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target


def plain(text: str) -> str:
    """``text`` without reST inline markup: roles become their target (``~`` keeps the last
    name, an explicit title wins), literals and strong emphasis lose their marks."""
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    return _STRONG.sub(r"\1", text)


def doc_help(doc: str | None, paragraphs: int = 1) -> str:
    """The first ``paragraphs`` paragraphs of a docstring, as plain text (argparse rewraps it)."""
    parts = (doc or "").strip().split("\n\n")
    return plain("\n\n".join(parts[:paragraphs]))
