"""The agent's own log lines, as text for people or JSON for log pipelines
(``--log-format``).

A JSON line is one object::

    {"time": "2026-12-07T21:30:00.123456Z", "level": "info",
     "event": "ready: policy /etc/egress-agent/policy.yaml (...)",
     "fields": {"logger": "egress_agent.agent.runner",
                "template": "ready: policy %s (%s)",
                "args": ["/etc/egress-agent/policy.yaml", "..."]}}

``event`` is the message as the text format shows it; ``fields`` says which
module logged it, the message before its values were filled in (the same for
every occurrence of that kind of line, to group and count by) and the values,
plus ``exception`` (the traceback) when one was logged. Audit records are not
log lines: they go to the audit log (``proxy/audit.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from egress_agent.proxy.audit import rfc3339

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "egress-agent: %(levelname)s %(message)s"

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _plain(value: Any) -> Any:
    """A value as JSON can hold it: numbers, strings, booleans and None as
    they are, anything else as its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"logger": record.name}
        if record.args:
            fields["template"] = str(record.msg)
            fields["args"] = _plain(record.args)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                fields[key] = _plain(value)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        return json.dumps(
            {
                "time": rfc3339(record.created),
                "level": record.levelname.lower(),
                "event": record.getMessage(),
                "fields": fields,
            },
            separators=(",", ":"),
        )


def configure_logging(*, level: str, log_format: str) -> None:
    """Send the agent's log lines to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # pyroute2 logs every netlink message at debug level.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.root.level))
