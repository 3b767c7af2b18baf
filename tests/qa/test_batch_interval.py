"""A device's notification interval (batch_interval_s): fewer, fuller notifications, the
same samples and the same routine outcome."""

from __future__ import annotations

import pytest

from devicebridge.qa import run_scenario
from simulators.errors import ScenarioError
from simulators.scenario.spec import parse_scenario
from tests.qa.conftest import scenario_text
from tests.qa.test_fault_outcomes import COMPLETE_WITHOUT_LOSS


def with_interval(interval_line: str) -> str:
    text = scenario_text(COMPLETE_WITHOUT_LOSS, duration_s=90)
    return text.replace('kind = "massager"\n', f'kind = "massager"\n{interval_line}', 1)


async def test_a_device_notifying_once_a_second_gives_the_same_samples() -> None:
    default = await run_scenario(parse_scenario(with_interval("")))
    slow = await run_scenario(parse_scenario(with_interval("batch_interval_s = 1.0\n")))
    assert default.failures == []
    assert slow.failures == []
    fast_stats, slow_stats = default.devices["m"].stats, slow.devices["m"].stats
    assert slow_stats.lost_samples == fast_stats.lost_samples == 0
    # A second of samples no longer fits one notification at the default MTU (26 samples
    # each), but it takes far fewer of them than ten 100 ms notifications.
    assert slow_stats.frames_ok / slow_stats.samples_delivered < 0.5 * (
        fast_stats.frames_ok / fast_stats.samples_delivered
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "batch_interval_s must be positive"), ("60", "batch_interval_s must be at most 10")],
)
def test_a_bad_interval_is_refused_with_its_place(value: str, message: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(with_interval(f"batch_interval_s = {value}\n"), label="s.toml")
    assert any(p.startswith("[[devices]] #1: " + message) for p in caught.value.problems)
