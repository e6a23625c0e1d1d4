"""fxdrop: approximate random dropout that skips the dropped work.

Public names only; everything else lives in submodules.
"""

from .config import DropoutConfig, FxdropError
from .ops.extension import backend_info
from .patterns import Pattern
from .scheduler import PatternScheduler
from .search import PatternDistribution, search_distribution
from .convert import convert, load_state_dict, set_p, sites, state_dict
from .audit import AuditReport, audit, ideal_speedup
from .reshuffle import reshuffle

import sys as _sys

# backend="fxdrop": registering needs torch._dynamo, which takes seconds to import; so it is registered
# here only when Dynamo is already loaded, and otherwise by the torch_dynamo_backends entry point on first
# use (or by importing fxdrop.backend).
if "torch._dynamo" in _sys.modules:
    from . import backend as _backend  # noqa: F401

__all__ = ["backend_info", "DropoutConfig", "FxdropError", "Pattern", "PatternDistribution", "PatternScheduler",
           "search_distribution", "convert", "sites", "set_p", "state_dict", "load_state_dict", "audit",
           "AuditReport", "ideal_speedup", "reshuffle"]
__version__ = "0.3.0"
