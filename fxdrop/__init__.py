"""fxdrop: approximate random dropout that skips the dropped work.

Public names only; everything else lives in submodules.
"""

from .ops.extension import backend_info
from .patterns import Pattern
from .scheduler import PatternScheduler
from .search import PatternDistribution, search_distribution
from .convert import convert, load_state_dict, sites, state_dict

__all__ = ["backend_info", "Pattern", "PatternDistribution", "PatternScheduler", "search_distribution", "convert", "sites",
           "state_dict", "load_state_dict"]
__version__ = "0.1.0"
