"""SIGINT / SIGTERM as an exception, and the record of them that no ``except`` can lose.

The handler raises `Interrupted`, so every ``finally`` runs and temp folders go. But Python
drops an exception raised where it cannot propagate: inside a finalizer (``__del__``, a
weakref callback) it is printed as "Exception ignored" and the run goes on. The handler also
records the signal, and the points that must not be passed after one (the output's final
swap, each export stage) call `raise_if_interrupted`. Standard library only: the lowest layers
(`io`) use it.
"""

from __future__ import annotations

import signal

# Signals received during this command, oldest first.
RECEIVED: list[int] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so ``except Exception`` never eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def on_signal(signum: int, frame: object) -> None:
    """The SIGINT / SIGTERM handler: record the signal, then raise it."""
    # One signal is enough: later ones are ignored so that the cleanup it starts can finish.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    RECEIVED.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise the `Interrupted` of a signal received earlier whose exception was swallowed."""
    if RECEIVED:
        raise Interrupted(RECEIVED[0]) from None
