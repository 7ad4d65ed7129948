"""Waiting for work on a ring: one routine for every kernel and both layouts.

A worker polls a ring a while before it sleeps (``spins`` empty looks in a row, counted in ``Q_IDLE`` across
kernel calls, so a kernel returning with nothing to do does not start the count again).  Before sleeping it
asks for kicks and looks once more -- the driver may have made a chain available before it saw the request --
and while it works it suppresses kicks again.  The routine is written once here and bound to a layout by
``make_poll(look, notify)`` (``ring.split.poll_avail``, ``ring.packed.poll_head``): the layout's functions are
then direct calls.  Measured on the fastest path (TX, direct, split; per pair of alternating bench runs against
the copy of the prelude in every kernel that this replaced): the functions passed as arguments instead
(indirect calls) 0.87x; ``poll`` inlined into every kernel at the Numba IR level 0.92x (a bigger kernel, less
inlined in its per-packet loop); as it is, a compiled helper with ``look`` inlined into it, 0.995x.
The layout's two compiled functions:

* ``look(q, ring, mem, table)``: ≥ 0 when a chain is available (split: how many; packed: the head's flags),
  ``NOTHING`` when none is, -1 with the queue broken;
* ``notify(q, area, mem, table, enable)``: write the layout's notification suppression (split: the used
  ring's flags or avail_event; packed: the device event area); False with the queue broken.
"""

from __future__ import annotations

from ..atomic import fence_full
from ..jit import helper
from .state import Q_IDLE, Q_WAKEUPS

#: what ``look`` returns when no chain is available (``ring.packed.NOT_AVAIL`` is the same value)
NOTHING = -2
#: results besides a ``look`` value: the queue broke, poll again (spins left), kicks asked for (sleep now)
POLL_BROKEN, POLL_AGAIN, POLL_IDLE = -1, -3, -4


def make_poll(look, notify):
    """The polling routine and its two-ring form bound to one layout's ``look`` and ``notify``."""

    @helper
    def poll(q, ring, area, mem, table, spins, want):
        """One look for work at a ring: ``look``'s value when a chain is there (kicks then suppressed), else
        POLL_AGAIN, POLL_IDLE or POLL_BROKEN.  ``want`` False: the kernel takes nothing now (a source at its
        limit); the ring is still looked at, so that a broken ring is seen, and the worker goes to sleep."""
        v = look(q, ring, mem, table)
        if v == -1:
            return POLL_BROKEN
        if v == NOTHING or not want:
            q[Q_IDLE] += 1
            if q[Q_IDLE] < spins:
                return POLL_AGAIN
            q[Q_IDLE] = 0
            if not notify(q, area, mem, table, 1):
                return POLL_BROKEN
            fence_full()  # the flag must be visible before the last look
            v = look(q, ring, mem, table)
            if v == -1:
                return POLL_BROKEN
            if v == NOTHING or not want:
                return POLL_IDLE
        q[Q_IDLE] = 0
        if not notify(q, area, mem, table, 0):
            return POLL_BROKEN
        q[Q_WAKEUPS] += 1
        return v

    @helper
    def poll_pair(q, ring, area, q2, ring2, area2, mem, table, spins):
        """``poll`` for a kernel that needs a chain on two rings at once (a loopback: TX and room on RX); the
        spins are counted on ``q``.  Returns the pair of ``look`` values, or a POLL_* result twice."""
        v = look(q, ring, mem, table)
        v2 = look(q2, ring2, mem, table)
        if v == -1 or v2 == -1:
            return POLL_BROKEN, POLL_BROKEN
        if v == NOTHING or v2 == NOTHING:
            q[Q_IDLE] += 1
            if q[Q_IDLE] < spins:
                return POLL_AGAIN, POLL_AGAIN
            q[Q_IDLE] = 0
            if not notify(q, area, mem, table, 1) or not notify(q2, area2, mem, table, 1):
                return POLL_BROKEN, POLL_BROKEN
            fence_full()
            v = look(q, ring, mem, table)
            v2 = look(q2, ring2, mem, table)
            if v == -1 or v2 == -1:
                return POLL_BROKEN, POLL_BROKEN
            if v == NOTHING or v2 == NOTHING:
                return POLL_IDLE, POLL_IDLE
        q[Q_IDLE] = 0
        if not notify(q, area, mem, table, 0) or not notify(q2, area2, mem, table, 0):
            return POLL_BROKEN, POLL_BROKEN
        q[Q_WAKEUPS] += 1
        return v, v2

    return poll, poll_pair
