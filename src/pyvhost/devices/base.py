"""The device API: what a virtio device built on pyvhost provides to the backend.

A device says which virtio features it offers, what its config space holds, how many queues it has, and how
its queues are served: ``workers()`` groups queue indices, and ``make_step()`` returns, for one group, the
function a worker thread calls in a loop.  The step runs one bounded pass over its rings (normally a compiled
kernel that releases the GIL) and returns a :class:`Step` status.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..access import RingViews
from ..memory import GuestMemory

# virtio 1.2 transport feature bits the backend handles for every device
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ANY_LAYOUT = 27


class Step(enum.IntEnum):
    """What one pass of a worker's loop found."""

    BROKEN = -1   # a ring is broken (its q[Q_ERROR] says why)
    IDLE = 0      # nothing to do; notifications are enabled, sleep on the kick fds
    MORE = 1      # budget used up with work left; call again
    STOPPED = 2   # the control plane asked the worker to stop


@dataclass
class Ring:
    """What a step function gets for one ring: its state array, its views, and the memory they belong to."""

    index: int
    q: np.ndarray
    views: RingViews
    mem: GuestMemory


StepFn = Callable[[int], int]


class Device(abc.ABC):
    """Subclass this to write a device."""

    #: virtio device id (1 = net, 2 = block)
    device_id: int = 0
    #: device-specific feature bits offered (the backend adds VERSION_1, INDIRECT_DESC, EVENT_IDX)
    features: int = 0
    #: number of virtqueues
    num_queues: int = 1

    def config_space(self) -> bytes:
        """The device's config space (GET_CONFIG reads from it)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG; read-only by default."""
        raise ValueError("config space is read-only")

    def set_features(self, features: int) -> None:
        """Called with the negotiated features (transport bits included)."""
        self.negotiated = features

    def workers(self) -> list[tuple[int, ...]]:
        """Queue groups, each served by one worker thread.  Default: one worker per queue."""
        return [(i,) for i in range(self.num_queues)]

    @abc.abstractmethod
    def make_step(self, rings: list[Ring]) -> StepFn:
        """The function a worker calls with a budget of passes; it returns a Step value."""

    def prepare_queue(self, index: int, q: np.ndarray) -> None:
        """Set device-specific fields of a queue's state before its worker starts."""

    def stats(self) -> dict:
        return {}
