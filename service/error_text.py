"""How the service turns an exception into the text a status reason or a probe shows."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """'Type: message', for errors whose type says as much as their message (an OSError's
    subclass, a database error)."""
    return f"{type(exc).__name__}: {exc}"


def short_message(exc: BaseException) -> str:
    """The message on one line: its first line, or for a server's traceback (Ray's 500 answers
    carry one) its first line and its last, which holds the actual error; the type's name when
    the message is empty."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return f"{lines[0]} ... {lines[-1]}"
    return text.splitlines()[0] if text else type(exc).__name__
