"""pyvhost: vhost-user device back-ends in Python with a validated-once direct ring datapath."""

__version__ = "0.1.0"
