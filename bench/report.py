"""A plain table printer shared by the benchmarks (no dependency beyond the stdlib)."""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os
import platform
import time
from collections.abc import Callable, Sequence


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """Fastest wall time in seconds of ``repeats`` runs (the least disturbed by noise)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value >= 1e6:
            return f"{value / 1e6:,.2f} M"
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    return str(value)


# The loop size the issues name a machine's speed by (they do not say which loop body).
LOOP_ITERATIONS = 10_000_000


@functools.cache
def python_loop_s() -> float:
    """Seconds a loop of ``LOOP_ITERATIONS`` empty iterations (``for _ in range(n): pass``)
    takes in this interpreter: the machine's speed at plain Python, which the figures
    measured against real time alone (virtual time's "x real time") depend on. Scaled from
    the fastest of 3 loops of a tenth as many (measured once per process)."""
    tenth = LOOP_ITERATIONS // 10

    def loop() -> None:
        for _ in range(tenth):
            pass

    return best_of(3, loop) * 10


def describe_machine() -> str:
    """One line naming the machine the absolute figures come from (ratios travel, times do not)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                model,
            )
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (
        f"measured on: {model}, {os.cpu_count()} cores{load}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {describe_build()}, "
        f"a {LOOP_ITERATIONS / 1e6:g}-million-iteration Python loop {python_loop_s():.2f} s"
    )


def describe_build() -> str:
    """Which build ran (the modules of ``[tool.devicebridge.compile]`` in pyproject.toml):
    the same bench gives other figures on the pure-Python install and on the mypyc build."""
    engine = importlib.import_module("devicebridge.core.engine.massage")
    path = getattr(engine, "__file__", None) or ""
    if path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return (
            "compiled build (mypyc: the pure cores, the session, a run's safety path, "
            "worker and batcher)"
        )
    return "pure-Python install (nothing compiled)"
