"""Throttled log lines: a few of each kind per window, a notice when more are held back,
and the count of those held back with the next line after the window."""

from __future__ import annotations

import logging

import pytest

from devicebridge.logthrottle import ThrottledLog

LOGGER = logging.getLogger("tests.logthrottle")


def test_each_kind_is_throttled_on_its_own_and_the_suppressed_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now_s = [0.0]
    log = ThrottledLog(LOGGER, burst=3, window_s=60.0, now_s=lambda: now_s[0])
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for n in range(1000):
            log.log(logging.WARNING, "bad", "bad payload %d", n)
        log.log(logging.WARNING, "other", "another kind")
        first_window = [r.getMessage() for r in caplog.records]
        caplog.clear()
        now_s[0] = 61.0
        log.log(logging.WARNING, "bad", "bad payload %d", 1000)
        second_window = [r.getMessage() for r in caplog.records]

    assert first_window == [
        "bad payload 0",
        "bad payload 1",
        "bad payload 2",
        "more than 3 bad lines in 60 s: further ones are suppressed (and counted) until the"
        " window ends",
        "another kind",
    ]
    assert second_window == [
        "997 more bad line(s) were suppressed in the 61 s before this one",
        "bad payload 1000",
    ]


def test_the_traceback_goes_with_the_lines_that_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = ThrottledLog(LOGGER, burst=1)
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        for _ in range(3):
            try:
                raise RuntimeError("a bug")
            except RuntimeError:
                log.log(logging.ERROR, "bug", "it failed", exc_info=True)
    assert [r.exc_info is not None for r in caplog.records] == [True, False]
