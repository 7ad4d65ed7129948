"""Surviving a front-end that truncates a region's file while it is mapped.

An access to a page of a shared file mapping past the file's end raises SIGBUS in the thread that made it,
synchronously and usually inside compiled code, so no Python-level handler can run in time.  A small C handler
(``_sigbus.c``, built at install) does instead: for a faulting address inside a guarded range (each
connection's :class:`~pyvhost.memory.Arena`) it maps an anonymous zero page over the faulting page, counts the
fault, keeps the first address, and writes the range's eventfd; the access then completes (reading zeros).
The control plane polls that eventfd and tears the connection down with a logged error.  A fault anywhere
else keeps the process's previous disposition (SIG_DFL: the process dies, as before).
"""

from __future__ import annotations

from . import _sigbus


def install() -> None:
    """Install the handler (idempotent); done at server start."""
    _sigbus.install()


def installed() -> bool:
    """Whether the handler is the process's SIGBUS disposition now."""
    return bool(_sigbus.installed())


def guard(base: int, size: int, notify_fd: int = -1) -> int:
    """Recover SIGBUS in [base, base+size), writing ``notify_fd`` (an eventfd, or -1) on each; returns a slot."""
    return int(_sigbus.guard(base, size, notify_fd))


def unguard(slot: int) -> None:
    """Stop guarding the range of ``slot`` (before its address space is given back)."""
    _sigbus.unguard(slot)


def faults(slot: int) -> tuple[int, int]:
    """(number of faults recovered in the range of ``slot``, first faulting address or 0)."""
    n, first = _sigbus.faults(slot)
    return int(n), int(first)
