"""torch.distributed on oneCCL for Xeon clusters.

Importing this package registers the ``oneccl`` backend name with torch.distributed
(the C++ extension loads only when a process group uses it). ``init()`` starts a
process group from whichever launcher started the process.
"""

from ipex_lars.distributed.backend import EXTENSIONS, register
from ipex_lars.distributed.process_group import BackendUnavailableError, DistInfo, init, shutdown
from ipex_lars.distributed.rendezvous import MissingRankError, RendezvousError

register()

__all__ = [
    "EXTENSIONS",
    "BackendUnavailableError",
    "DistInfo",
    "MissingRankError",
    "RendezvousError",
    "init",
    "register",
    "shutdown",
]
