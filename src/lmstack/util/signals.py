"""Signals: handlers that raise (and the one case where the exception would be lost), and how
a child process that a signal ended is described."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType

# An exception raised in a finalizer (a __del__ the garbage collector runs, as it can during
# any import) is printed as "Exception ignored" and dropped, and the program goes on: measured,
# 4 of 80 SIGTERMs sent during the train phase's imports landed in regex's Group.__del__
RESEND_AFTER_S = 0.05


def resent_from_finalizer(signum: int, frame: FrameType | None) -> bool:
    """True when the signal landed in a finalizer, where the handler's exception would be
    dropped: the signal is then sent again shortly, to be handled outside it, and the handler
    returns without raising."""
    if not in_finalizer(frame):
        return False
    resend = threading.Timer(RESEND_AFTER_S, os.kill, (os.getpid(), signum))
    resend.daemon = True
    resend.start()
    return True


def in_finalizer(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


# what a native program's death by these signals most often means here, and what to do
SIGNAL_CAUSES = {
    "SIGILL": (
        "an illegal instruction: it was built for another CPU; rebuild it with `make engines`"
    ),
    "SIGBUS": "a bus error: a memory-mapped file shrank under it, or the disk is full",
}


def how_it_ended(returncode: int | None) -> str:
    """'exit 1', or the signal that killed it ('killed by SIGABRT'), with the likely cause
    where the signal names one ('killed by SIGILL, an illegal instruction: ...')."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-returncode).name
            cause = SIGNAL_CAUSES.get(name)
            return f"killed by {name}, {cause}" if cause else f"killed by {name}"
    return f"exit {returncode}"
