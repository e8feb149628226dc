"""Communicators: one object per way of moving bytes between ranks.

The coordinator holds several and picks one per call; each owns its resources and its own `capture()`
context, so the coordinator can prepare all of them for graph capture without knowing their internals.
"""

from graphcap.distributed.communicators.base import Communicator
from graphcap.distributed.communicators.shm import ShmCommunicator, ShmPeerError, ShmTimeoutError
from graphcap.distributed.communicators.torch_dist import TorchDistCommunicator

__all__ = ["Communicator", "ShmCommunicator", "ShmPeerError", "ShmTimeoutError", "TorchDistCommunicator"]
