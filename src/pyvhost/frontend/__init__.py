"""pyvhost's vhost-user front-end (the driver side, no VM): guest RAM, split and packed driver rings, a net
driver (:class:`Frontend`) and a block driver (:class:`BlkFrontend`)."""

from .net import Frontend, FrontendError
from .ram import BUF_SIZE, GuestRam

__all__ = ["BUF_SIZE", "Frontend", "FrontendError", "GuestRam"]
