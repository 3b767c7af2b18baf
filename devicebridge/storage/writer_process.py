"""The store writer's process (:mod:`devicebridge.storage.writer`): runs the jobs of every
store writer of the bridge's process, one at a time, in the order they arrive.

It reads framed pickles on its stdin (``multiprocessing.connection`` framing) from the
bridge's process that started it, and only from it:

- ``("share", token, obj)``: an object later jobs name by ``token`` (a safety policy, a
  routine); ``("forget", token)``: no later job names it;
- ``("job", job_id, writer_id, path, body)``: ``body`` pickles ``(function, args)``;
  ``function(desk, *args)`` runs with the :class:`StoreDesk` of writer ``writer_id`` (its
  store at ``path``, opened at its first job), and ``(job_id, True, result)`` or
  ``(job_id, False, exception)`` goes back on its stdout (an exception that cannot cross
  goes as its traceback's text).

It runs only on cores nothing else wants (:func:`devicebridge.storage.children.lowest_priority`:
SCHED_IDLE on Linux), so that it never delays the bridge's event loop nor the devices'
processes; on a machine kept busy, its jobs wait (the telemetry in the pipe, up to
``JOB_PIPE_BYTES``; then the loop waits for room, and the machine frees a core). It ends
when its stdin closes, once every job it was sent is done: when the bridge exits, or is
killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from devicebridge.storage.children import lowest_priority
from devicebridge.storage.desk import (
    StoreDesk,
    cross_core_dataclasses,
    forget_object,
    share_object,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

_CORE_POLICY: Final = "devicebridge.core.policy"


def _crossing(exc: BaseException) -> BaseException | str:
    """``exc`` if it survives a pickle's round trip as itself, else its traceback's text."""
    try:
        back = pickle.loads(pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))
        if type(back) is type(exc) and str(back) == str(exc):
            return exc
    except Exception:  # any failure to cross sends the text instead
        pass
    return "".join(traceback.format_exception(exc))


def serve(jobs: Connection, answers: Connection) -> None:
    """Run every job of ``jobs`` in order, answering each on ``answers``, until ``jobs``
    ends; then close every store still open."""
    desks: dict[int, StoreDesk] = {}
    while True:
        try:
            message = pickle.loads(jobs.recv_bytes())
        except EOFError:
            break
        if message[0] == "share":
            _, token, obj = message
            share_object(token, obj)
            continue
        if message[0] == "forget":
            forget_object(message[1])
            continue
        _, job_id, writer_id, path, body = message
        desk = desks.get(writer_id)
        if desk is None:
            desk = desks[writer_id] = StoreDesk(Path(path))
        failure: Exception | None = None
        try:
            function, args = pickle.loads(body)
            result = function(desk, *args)
        except Exception as exc:  # every failure goes back to the job's owner
            failure = exc
        if desk.closed:
            del desks[writer_id]
        if _CORE_POLICY in sys.modules:
            # The answer may hold the core's dataclasses (an admission, a policy), which
            # cross through their __init__ (see cross_core_dataclasses); a job that has
            # none loaded the policy's module (every one of them uses it).
            cross_core_dataclasses()
        answer: tuple[int, bool, Any] = (
            (job_id, True, result) if failure is None else (job_id, False, _crossing(failure))
        )
        try:
            data = pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a result that cannot cross: a bug
            data = pickle.dumps((job_id, False, _crossing(exc)), pickle.HIGHEST_PROTOCOL)
        answers.send_bytes(data)
    for desk in desks.values():
        desk.close()


def main() -> None:
    from multiprocessing.connection import Connection

    logging.basicConfig(format="devicebridge store writer: %(message)s", level=logging.WARNING)
    # The answers go on the stdout given; anything printed goes to stderr instead.
    answers_fd = os.dup(1)
    os.dup2(2, 1)
    lowest_priority()
    jobs = Connection(os.dup(sys.stdin.fileno()), writable=False)
    answers = Connection(answers_fd, readable=False)
    # The bridge gone: nothing to answer.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(jobs, answers)


if __name__ == "__main__":
    main()
