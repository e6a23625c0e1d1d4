"""fxdrop: approximate random dropout that skips the dropped work.

Public names only; everything else lives in submodules.
"""

from .patterns import Pattern
from .scheduler import PatternScheduler
from .search import PatternDistribution, search_distribution

__all__ = ["Pattern", "PatternDistribution", "PatternScheduler", "search_distribution"]
__version__ = "0.1.0"
