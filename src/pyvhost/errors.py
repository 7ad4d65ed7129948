"""One error enum for everything that can break a queue (the guest's fault), with the log text for each."""

from __future__ import annotations

import enum


class QueueError(enum.IntEnum):
    """Why a queue was marked broken.  Compiled code stores the code and the offending value in the queue
    state; the control plane turns them into one clear log line and signals the ERR eventfd."""

    NONE = 0
    RING_UNMAPPED = 1
    AVAIL_IDX_JUMP = 2
    HEAD_OUT_OF_RANGE = 3
    NEXT_OUT_OF_RANGE = 4
    CHAIN_TOO_LONG = 5
    INDIRECT_BAD_SIZE = 6
    INDIRECT_NESTED = 7
    INDIRECT_WITH_NEXT = 8
    INDIRECT_UNMAPPED = 9
    ZERO_LENGTH = 10
    BAD_ADDRESS = 11
    BAD_DIRECTION = 12
    PACKED_BAD_WRAP = 13
    PACKED_BAD_ID = 14
    PACKED_INDIRECT_IN_CHAIN = 15
    PACKED_ID_IN_USE = 16

    @property
    def text(self) -> str:
        return _TEXT[self]


_TEXT = {
    QueueError.NONE: "no error",
    QueueError.RING_UNMAPPED: "a ring address does not translate into guest memory",
    QueueError.AVAIL_IDX_JUMP: "the driver moved the avail index by more than the queue size",
    QueueError.HEAD_OUT_OF_RANGE: "an avail ring entry names a descriptor outside the table",
    QueueError.NEXT_OUT_OF_RANGE: "a descriptor's next field is outside the table",
    QueueError.CHAIN_TOO_LONG: "a descriptor chain is longer than the queue allows (a loop?)",
    QueueError.INDIRECT_BAD_SIZE: "an indirect table's length is zero, not a multiple of 16, or too large",
    QueueError.INDIRECT_NESTED: "an indirect table contains an indirect descriptor",
    QueueError.INDIRECT_WITH_NEXT: "a descriptor has both INDIRECT and NEXT set",
    QueueError.INDIRECT_UNMAPPED: "an indirect table does not lie inside guest memory",
    QueueError.ZERO_LENGTH: "a descriptor has length zero",
    QueueError.BAD_ADDRESS: "a buffer does not lie inside guest memory",
    QueueError.BAD_DIRECTION: "a buffer's direction is wrong for this queue (or readable after writable)",
    QueueError.PACKED_BAD_WRAP: "a packed descriptor's AVAIL/USED bits do not fit the wrap counter (a used "
    "descriptor of this lap at the next avail position, or a chain continuing into "
    "a descriptor that is not available; value: position << 16 | flags)",
    QueueError.PACKED_BAD_ID: "a packed chain's buffer id is not below the queue size",
    QueueError.PACKED_INDIRECT_IN_CHAIN: "a packed chain mixes an indirect descriptor with chained ones",
    QueueError.PACKED_ID_IN_USE: "a packed chain's buffer id is that of a chain the device has not completed yet",
}


def describe(code: int, value: int) -> str:
    try:
        err = QueueError(code)
    except ValueError:
        return f"unknown error {code} (value {value})"
    return f"{err.name}: {err.text} (value {value & 0xFFFF_FFFF_FFFF_FFFF:#x})"  # a u64 the queue state holds as i64
