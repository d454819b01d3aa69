"""Logging set-up: one JSON object per line (default) or plain text for humans.

Records carry structured fields in ``extra={"fields": {...}}``; the JSON formatter merges them
into the object, the text formatter appends them as ``key=value``. Never pass secrets, codes,
cookies or full credential ids as fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

FIELDS = "fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """``log.info("msg", extra=fields(a=1))``."""
    return {FIELDS: values}


def describe_error(exc: BaseException) -> str:
    """A failure talking to the console, fit for a log line: its kind, never its message.

    aiohttp's messages can include the request URL (its query may carry tokens), request
    headers (cookies, authorization) and raw bytes of the console's answer (a ``Set-Cookie``
    line quoted by a parser error). The exception type is kept, plus the operating system's
    text for socket errors ("Connection refused"), which carries none of those.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def log_config_warnings(warnings: Iterable[str], *, trigger: str) -> None:
    """Each config warning (a ``path: message`` line, ``sidecar.config_checks``) as one
    warning record of logger ``sidecar.config``: at start-up and after every reload, so an
    accepted insecure setting is never out of sight."""
    log = logging.getLogger("sidecar.config")
    for line in warnings:
        log.warning("config warning: %s", line, extra=fields(trigger=trigger))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, FIELDS, None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, FIELDS, None)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def configure_logging(level: str, fmt: str) -> None:
    """Route every logger (ours, aiohttp's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp warns on every relayed WebSocket whose client offered subprotocols the console
    # did not pick; for a proxy that is normal (the client then gets none, as it would
    # directly).
    logging.getLogger("aiohttp.websocket").setLevel(logging.ERROR)
