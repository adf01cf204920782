"""Ctrl-C that a library swallowed.

Contract
--------
:func:`install` (called by ``harness.cli.run_main``) makes SIGINT set a flag before it raises
``KeyboardInterrupt``. A library can catch that exception inside its own call and re-raise it as
its own error (TVM's FFI turns it into a ``RuntimeError``; a backend's import turns it into "not
installed"), so code that records a broad ``except Exception`` as a result (a build's
``compile_failed``, a backend's unavailability) calls :func:`check` first: after a Ctrl-C the run
stops and keeps what it stored, instead of storing the interruption as the network's failure.
"""

from __future__ import annotations

import signal

_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT records the interrupt, then raises ``KeyboardInterrupt`` as Python's own handler does."""
    signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C arrived earlier, even where a library swallowed it."""
    if _interrupted:
        raise KeyboardInterrupt
