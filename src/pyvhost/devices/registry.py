"""The devices ``pyvhost serve`` knows: pyvhost's own and those of any installed package.

A device is declared by a :class:`DeviceSpec`: its name, a one-line help, the ``serve`` arguments it adds and
a factory that builds it from the parsed arguments.  Declaring costs nothing: a factory may be named as
``"module:function"`` and is imported only when the device is served, so ``pyvhost --help`` never loads the
compiled datapath.  A package adds a device through the ``pyvhost.devices`` entry-point group; in its
``pyproject.toml``::

    [project.entry-points."pyvhost.devices"]
    echo = "pyvhost_echo:SPEC"

where ``pyvhost_echo.SPEC`` is a :class:`DeviceSpec` whose factory returns a :class:`~pyvhost.devices.base.Device`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Device

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pyvhost.devices"

Factory = Callable[[argparse.Namespace], "Device"]


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For a device that takes nothing beyond the common ``serve`` arguments."""


@dataclass(frozen=True)
class DeviceSpec:
    """How ``pyvhost serve NAME`` builds a device."""

    name: str
    help: str
    #: builds the device from the parsed arguments (warming its kernels up); ``"module:function"`` is imported
    #: only when called
    factory: str | Factory
    #: adds the device's own arguments to its ``serve NAME`` parser (the common ones are added for every device)
    add_arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    #: why one process cannot serve the device on several sockets (``--socket-count N`` refused, this said);
    #: None: each socket gets a device of its own, built by the factory with ``args.socket_index`` set
    one_socket: str | None = None

    def create(self, args: argparse.Namespace) -> Device:
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(args)


def discover(builtin: dict[str, DeviceSpec]) -> dict[str, DeviceSpec]:
    """``builtin`` plus every device installed under the entry-point group. A broken or clashing plug-in is
    logged and left out; it never stops pyvhost's own devices from being served."""
    specs = dict(builtin)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in specs:
            log.warning("device %r from %s ignored: the name is taken", ep.name, ep.value)
            continue
        try:
            spec = ep.load()
        except Exception as e:  # a third-party import error must not take the built-in devices down
            log.error("device %r from %s cannot be loaded: %s", ep.name, ep.value, e)
            continue
        if not isinstance(spec, DeviceSpec):
            log.error("device %r from %s is a %s, not a DeviceSpec", ep.name, ep.value, type(spec).__name__)
            continue
        specs[ep.name] = spec
    return specs
