"""One redaction function for everything Shipyard itself writes.

The control plane registers every secret value it reads or is given (`register`);
`redact(text)` then replaces each known value in `text` with `<secret:NAME>`. It runs on
event messages and instance messages before they are stored, on error answers of the API,
and on every log record (`register` installs a log-record factory the first time, which
also redacts the formatted traceback of a record).

Values shorter than `MIN_LENGTH` characters are not redacted (they would turn up inside
ordinary words); a value over several lines is also redacted line by line, for lines of at
least `MIN_LINE` characters (a PEM key quoted one line at a time).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import traceback
from typing import Any, Protocol, TypeVar

from pydantic import SecretStr

MIN_LENGTH = 4
MIN_LINE = 16

_lock = threading.Lock()
_known: dict[str, str] = {}  # value → the name of its secret
_pattern: re.Pattern[str] | None = None
_factory_installed = False


class _EventLike(Protocol):
    message: str
    data: dict[str, Any]


E = TypeVar("E", bound=_EventLike)


def register(name: str, value: SecretStr | str) -> None:
    """Remember `value` (of the secret `name`) so that it is redacted from now on."""
    plain = value.get_secret_value() if isinstance(value, SecretStr) else value
    pieces = [plain] if len(plain) >= MIN_LENGTH else []
    if "\n" in plain:
        pieces += [line.strip() for line in plain.splitlines() if len(line.strip()) >= MIN_LINE]
    global _pattern
    with _lock:
        new = [p for p in pieces if p not in _known]
        if not new:
            return
        for piece in new:
            _known[piece] = name
        ordered = sorted(_known, key=len, reverse=True)  # the longest match first
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))
    _install_log_factory()


def known() -> bool:
    """Whether any value is registered."""
    return _pattern is not None


def is_value(text: str) -> bool:
    """Whether `text` is exactly a registered secret value."""
    return text in _known


def redact(text: str) -> str:
    """`text` with every known secret value replaced by `<secret:NAME>`."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(lambda m: f"<secret:{_known.get(m.group(0), '?')}>", text)


def redact_any(value: Any) -> Any:
    """`redact` through the strings of a JSON-like value (dicts, lists, tuples)."""
    if _pattern is None:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_any(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_any(v) for v in value)
    return value


def redact_event(event: E) -> E:
    """An event (`shipyard.state.base.Event`) with its message and data redacted; the
    same object when there is nothing to redact."""
    if _pattern is None:
        return event
    message, data = redact(event.message), redact_any(event.data)
    if message == event.message and data == event.data:
        return event
    return dataclasses.replace(event, message=message, data=data)


def forget_all() -> None:
    """Drop every registered value (tests)."""
    global _pattern
    with _lock:
        _known.clear()
        _pattern = None


def _install_log_factory() -> None:
    """Redact each log record as it is made: its message (arguments formatted in) and
    its traceback, so no handler or formatter ever sees a value."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        _factory_installed = True
        previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _pattern is None:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact(text)
            record.exc_info = None  # formatters use exc_text; never the raw exception
        return record

    logging.setLogRecordFactory(factory)
