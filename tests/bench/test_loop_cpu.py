"""bench/loop_cpu.py: the loop's callbacks timed by what they run, and asyncio as it was
once the measuring window is over."""

import asyncio
import asyncio.events

from bench.loop_cpu import LoopCpu, callback_label


def _busy() -> int:
    return sum(range(200_000))


async def _stepping(steps: int) -> None:
    for _ in range(steps):
        _busy()
        await asyncio.sleep(0)


async def test_each_callback_is_counted_under_what_it_runs() -> None:
    loop = asyncio.get_running_loop()
    original = asyncio.events.Handle._run
    with LoopCpu() as loop_cpu:
        assert asyncio.events.Handle._run is not original
        done = loop.create_future()
        loop.call_soon(lambda: done.set_result(_busy()))
        await asyncio.create_task(_stepping(5))
        await done
    assert asyncio.events.Handle._run is original
    # A task's first step and one per sleep(0), and the end: under its coroutine's name.
    assert loop_cpu.calls["task _stepping"] == 6
    lambda_label = "test_each_callback_is_counted_under_what_it_runs.<locals>.<lambda>"
    assert loop_cpu.calls[lambda_label] == 1
    assert loop_cpu.cpu_s["task _stepping"] > loop_cpu.cpu_s[lambda_label] > 0.0


async def test_nothing_is_counted_outside_the_window() -> None:
    loop_cpu = LoopCpu()
    with loop_cpu:
        pass
    await asyncio.create_task(_stepping(3))
    assert not loop_cpu.calls
    assert not loop_cpu.cpu_s


async def test_labels_of_plain_callbacks_and_task_steps() -> None:
    task = asyncio.create_task(_stepping(0))
    await task
    assert callback_label(task.cancel) == "task _stepping"
    assert callback_label(_busy) == "_busy"
    assert callback_label(print) == "print"
