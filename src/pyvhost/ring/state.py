"""Per-queue state: one int64 array per virtqueue, shared by the control plane and the compiled loops
(split and packed rings and every device).  Field indices are ``Q_*``."""

from __future__ import annotations

import numpy as np

# -- per-queue state: one int64 array, shared by the control plane and the compiled loop ----------------
Q_SIZE = 0
Q_MASK = 1
Q_DIRECT = 2
Q_DESC = 3  # ring addresses (front-end virtual), used by the copy path
Q_AVAIL = 4
Q_USED = 5
Q_LAST_AVAIL = 6  # free-running 16-bit index of the next avail entry to take
Q_USED_IDX = 7  # free-running 16-bit used index we have published
Q_EVENT_IDX = 8  # VIRTIO_RING_F_EVENT_IDX negotiated
Q_CALLFD = 9  # -1: none
Q_ERROR = 10  # QueueError
Q_ERROR_VALUE = 11
Q_PACKETS = 12  # device counters
Q_BYTES = 13
Q_DROPS = 14
Q_STOP = 15  # set by the control plane: leave the loop now
Q_SIGNALLED = 16  # used index at the last call (EVENT_IDX)
Q_SIGNALLED_VALID = 17
Q_NOTIFY_ON = 18  # 1 while the device asks for kicks, 0 while it suppresses them, -1 not yet written
Q_CALLS = 19  # calls signalled
Q_BATCH = 20  # most chains taken per pass
Q_HDR_LEN = 21  # virtio-net header length (device specific)
Q_MRG = 22  # VIRTIO_NET_F_MRG_RXBUF
Q_CHAINS = 23  # chains completed
Q_WAKEUPS = 24  # passes that found work
Q_LIMIT = 25  # source devices: stop producing after this many packets (-1: no limit)
Q_IDLE = 26  # empty polls in a row (kept across kernel calls, so polling before sleeping is bounded)
# packed rings only (ring/packed.py): Q_LAST_AVAIL and Q_USED_IDX are then positions in [0, size)
Q_AVAIL_WRAP = 27  # the device's avail wrap counter (0/1)
Q_USED_WRAP = 28  # the device's used wrap counter (0/1)
Q_PACKED = 29  # 1: the ring is packed
# dirty logging (VHOST_F_LOG_ALL): the log is mapped in the guest memory arena; Q_LOG_SIZE 0 while logging is off
Q_LOG_OFF = 30  # arena offset of the log bitmap
Q_LOG_SIZE = 31  # its size in bytes
# direct path: arena offsets of the ring parts the device writes (written through views; logged by offset)
Q_DESC_AT = 32  # descriptor table (packed rings write descriptors back)
Q_USED_AT = 33  # used ring (split) / device event suppression area (packed)
# net source (devices/net_frame.py): 1 = stamp each frame with its sequence number and UDP checksum
Q_SEQ = 39
# the last address fault (behind a vIOMMU the backend asks the front-end for the missing IOVA, backend.py)
Q_FAULT_WRITE = 34  # 1: the faulting buffer is one the device writes (SPACE_GPA_W), 0: one it reads
Q_FAULT_LEN = 35  # bytes of the range that did not translate (an indirect table's length; 1 for a buffer)
# a completion the driver asked to be told of went unsignalled: the ring had no call fd then (the backend
# signals the call fd SET_VRING_CALL brings, once)
Q_CALL_MISSED = 36
Q_FIELDS = 40


def new_queue_state(size: int) -> np.ndarray:
    q = np.zeros(Q_FIELDS, dtype=np.int64)
    q[Q_SIZE] = size
    q[Q_MASK] = size - 1
    q[Q_CALLFD] = -1
    q[Q_BATCH] = 256
    q[Q_NOTIFY_ON] = 1
    q[Q_LIMIT] = -1
    return q
