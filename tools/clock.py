"""`datetime`: the current date and time for a UTC offset or a time zone."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from datetime import timezone as tz

from .registry import ToolCallError, tool

def _utc_now() -> datetime:
    return datetime.now(tz.utc)


# The clock the datetime tool reads. Tests (or a deterministic evaluation) replace it:
#   monkeypatch.setattr(vocalign.tools.clock, "clock", lambda: datetime(2025, 1, 2, tzinfo=tz.utc))
clock: Callable[[], datetime] = _utc_now

_OFFSET = re.compile(r"(?:UTC|GMT)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?")


def parse_utc_offset(text: str) -> timedelta:
    """'+05:30', '-3', 'UTC+2', '+0930' -> a timedelta within +-14 h; ToolCallError otherwise."""
    text = str(text).strip()
    if text.upper() in ("Z", "UTC", "GMT", "0", "+0", "-0"):
        return timedelta(0)
    match = _OFFSET.fullmatch(text.upper())
    if not match:
        raise ToolCallError(f"utc_offset {text!r} is not an offset like '+05:30' or '-3'")
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
    delta = timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1)
    if minutes >= 60 or abs(delta) > timedelta(hours=14):
        raise ToolCallError(f"utc_offset {text!r} is out of range (-14:00 to +14:00)")
    return delta


@tool(
    "datetime",
    description="The current date, time and weekday, in UTC or at a UTC offset or time zone.",
    parameters={"type": "object", "properties": {
        "utc_offset": {"type": "string", "description": "e.g. \"+05:30\" or \"-3\""},
        "timezone": {"type": "string", "description": "an IANA time zone, e.g. \"Europe/Paris\""},
    }, "required": []},
)
def datetime_tool(utc_offset: str | None = None, timezone: str | None = None) -> str:
    now = clock()
    if now.tzinfo is None:
        now = now.replace(tzinfo=tz.utc)
    if timezone is not None and utc_offset is not None:
        raise ToolCallError("give utc_offset or timezone, not both")
    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            local = now.astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolCallError(f"time zone {timezone!r} is not known; use a name like 'Europe/Paris' or a utc_offset") from None
    else:
        local = now.astimezone(tz(parse_utc_offset(utc_offset or "0")))
    offset = local.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    label = f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{local:%Y-%m-%d %H:%M:%S} ({local:%A}), {label}"
