"""Names people use for what the code calls by identifier: zones, device kinds, channels.

Tables and live views show these; ``--json`` and CSV keep the identifiers, which scripts
match on.
"""

from __future__ import annotations

from typing import Final

KIND_WORDS: Final = {"massager": "massager", "led_mask": "LED mask", "mask": "LED mask"}
CHANNEL_WORDS: Final = {"red": "red", "near_infrared": "near-infrared", "blue": "blue"}
# Zones whose plain name is not their identifier with spaces.
ZONE_WORDS: Final = {
    "eye_area": "eye area",
    "nasolabial": "nasolabial fold",
    "masseter": "masseter (jaw muscle)",
}
SIDES: Final = ("left", "right")


def kind_words(kind: str | None) -> str:
    """``led_mask`` -> ``LED mask``."""
    if kind is None:
        return "-"
    return KIND_WORDS.get(kind, kind.replace("_", " "))


def a_kind(kind: str) -> str:
    """``a massager``, ``an LED mask``."""
    words = kind_words(kind)
    return f"{'an' if words[:1].lower() in 'aeiou' or words.startswith('LED') else 'a'} {words}"


def zone_words(zone: str | None) -> str:
    """``cheek_left`` -> ``left cheek``, ``eye_area_right`` -> ``right eye area``."""
    if zone is None:
        return "-"
    base, side = zone, ""
    for candidate in SIDES:
        if zone.endswith("_" + candidate):
            base, side = zone[: -len(candidate) - 1], candidate
    words = ZONE_WORDS.get(base, base.replace("_", " "))
    return f"{side} {words}" if side else words


def channel_words(channel: str) -> str:
    return CHANNEL_WORDS.get(channel, channel.replace("_", " "))


def duration_words(seconds: float) -> str:
    """``m:ss``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"
