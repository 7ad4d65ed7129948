"""The device API: what a virtio device built on pyvhost provides to the backend.

A device says which virtio features it offers, what its config space holds, how many queues it has, and how
its queues are served: ``workers()`` groups queue indices, and ``make_step()`` returns, for one group, the
function a worker thread calls in a loop.  The step runs one bounded pass over its rings (normally a compiled
kernel that releases the GIL) and returns a :class:`Step` status.

A step that keeps views of guest memory between calls, or hands them to other threads, also has
``drain(timeout) -> list[int]``: the worker calls it once when it leaves its loop, whatever the reason (stopped,
a broken ring, an error, an exception in the step); it completes (or drops) what the step took and lets go of
every view, waiting at most ``timeout`` seconds, and returns the heads of the chains whose buffers may still be
in use (empty: none).  While that list is not empty the backend keeps guest memory mapped; ``held()`` asks
again later (once the worker has ended).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..access import PackedViews, RingViews
from ..memory import GuestMemory

if TYPE_CHECKING:
    from ..ring.inflight import QueueRegion

log = logging.getLogger(__name__)

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

    BROKEN = -1  # a ring is broken (its q[Q_ERROR] says why)
    IDLE = 0  # nothing to do; notifications are enabled, sleep on the kick fds
    MORE = 1  # budget used up with work left; call again
    STOPPED = 2  # the control plane asked the worker to stop


@dataclass
class Ring:
    """What a step function gets for one ring: its state array, its views, and the memory they belong to."""

    index: int
    q: np.ndarray
    views: RingViews | PackedViews
    mem: GuestMemory
    #: the ring's kick eventfd (-1: none); a step that waits for something else too may wait on it
    kick_fd: int = -1
    #: the ring's region of the inflight area (SET_INFLIGHT_FD), if the front-end gave one
    inflight: QueueRegion | None = None


StepFn = Callable[[int], int]


class Device(abc.ABC):
    """Subclass this to write a device."""

    #: virtio device id (1 = net, 2 = block)
    device_id: int = 0
    #: device-specific feature bits offered (the backend adds VERSION_1, INDIRECT_DESC, EVENT_IDX)
    features: int = 0
    #: number of virtqueues
    num_queues: int = 1
    #: transport feature bits the backend must not offer for this device (e.g. a split-ring-only datapath)
    transport_features_off: int = 0
    #: the device records chains in flight (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD is offered)
    inflight_tracking: bool = False
    #: the device may sit behind a vIOMMU: VIRTIO_F_ACCESS_PLATFORM is offered (with the backend channel for
    #: IOTLB misses).  Only for devices whose every guest access goes through the translated ring and chain
    #: API and whose buffers held across steps are given back or drained when the worker stops.
    access_platform: bool = False

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

    def warm_up(self) -> None:
        """Compile (or load from the on-disk cache) the device's kernels.  The server calls it before it
        serves, so that no worker is still loading code when the control plane waits (bounded) for it to stop."""

    def discards_when_disabled(self, index: int) -> bool:
        """Whether queue ``index`` is processed while started but disabled (vhost-user "Ring states": "the
        back-end must process the ring without causing any side effects", e.g. a net device discards TX
        buffers and supplies no RX ones).  Default: not processed."""
        return False

    def discard_step(self, ring: Ring) -> StepFn:
        """The step of a started but disabled ring that :meth:`discards_when_disabled`: it takes the driver's
        buffers and completes them without acting on them (counted in Q_DROPS)."""
        raise NotImplementedError(f"{type(self).__name__} processes no disabled ring")

    def ring_enabled(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE of ring ``index`` (before its worker starts, after it stopped).  Default: nothing."""

    def driver_gone(self) -> None:
        """The driver's state is gone: the front-end disconnected or reset the owner, every ring is stopped.
        A device forgets what it kept for that driver (vsock: its connections)."""

    def stats(self) -> dict:
        """Device counters, reported beside the per-queue ones."""
        return {}

    def close(self) -> None:
        """Release what the device holds (files, threads) once it is served no more."""
