"""How long a recorded treatment blocks routines: one answer for every message.

A treatment's cool-down in the policy (``[cooldowns.<kind>]``) has up to two limits:
``massage_block_h`` (no massage of the treated zones) and ``facial_block_h`` (no routine
at all on them, LED included: after botulinum toxin, for instance). A facial block covers
massage too, so massage of a treated zone stays blocked until the later of the two ends.

A block runs from the treatment's date to its end: a treatment recorded for a future date
blocks nothing before that date. ``treatment add``, ``treatment list`` and the admission
refusal all take their blocks from :func:`treatment_blocks` and print them with
:func:`local_time`, so they always state the same duration and the same end.

Pure: datetimes in, blocks out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from devicebridge.core.policy import Limit, SafetyPolicy
from devicebridge.core.routine import DeviceKindName


class BlockKind(enum.StrEnum):
    MASSAGE = "massage"  # massage of the treated zones
    ANY_ROUTINE = "any_routine"  # every routine on the treated zones (massage and LED)


_WHAT: dict[BlockKind, str] = {
    BlockKind.MASSAGE: "massage of",
    BlockKind.ANY_ROUTINE: "any routine on",
}


def local_time(moment: datetime) -> str:
    """``2026-11-23 18:00`` in the user's time zone (a naive time is taken as local)."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True, slots=True)
class TreatmentBlock:
    """Routines of one kind are blocked on the treated zones for ``[starts_at, until)``."""

    kind: BlockKind
    starts_at: datetime  # the treatment's date
    until: datetime
    limit: Limit  # the policy limit that sets the duration (cite it)

    @property
    def hours(self) -> float:
        return self.limit.value

    def active_at(self, now: datetime) -> bool:
        return self.starts_at <= now < self.until

    def applies_to(self, device_kind: DeviceKindName) -> bool:
        return self.kind is BlockKind.ANY_ROUTINE or device_kind is DeviceKindName.MASSAGER

    def describe(self) -> str:
        """``massage of these zones is blocked for 168 h, until 2026-11-30 18:00``."""
        return (
            f"{_WHAT[self.kind]} these zones is blocked for {self.hours:g} h, "
            f"until {local_time(self.until)}"
        )


def treatment_blocks(
    policy: SafetyPolicy, treatment_kind: str, performed_at: datetime
) -> tuple[TreatmentBlock, ...]:
    """The massage block, then the any-routine block when the policy has one.

    Raises KeyError for a treatment kind the policy has no cool-down for.
    """
    cooldown = policy.cooldowns[treatment_kind]
    facial = cooldown.facial_block_h
    massage = cooldown.massage_block_h
    if facial is not None and facial.value > massage.value:
        massage = facial  # no routine at all includes no massage
    blocks = [_block(BlockKind.MASSAGE, performed_at, massage)]
    if facial is not None:
        blocks.append(_block(BlockKind.ANY_ROUTINE, performed_at, facial))
    return tuple(blocks)


def routine_block(
    policy: SafetyPolicy, treatment_kind: str, performed_at: datetime, device_kind: DeviceKindName
) -> TreatmentBlock | None:
    """The block a routine for ``device_kind`` meets on the treated zones (the longest)."""
    blocks = treatment_blocks(policy, treatment_kind, performed_at)
    applying = [b for b in blocks if b.applies_to(device_kind)]
    return max(applying, key=lambda b: b.until, default=None)


def _block(kind: BlockKind, performed_at: datetime, limit: Limit) -> TreatmentBlock:
    return TreatmentBlock(kind, performed_at, performed_at + timedelta(hours=limit.value), limit)
