"""What a converted model runs: region forwards (:mod:`.region`), the structured callables inside their
programs (:mod:`.structured`), and the structured RNN modules (:mod:`.rnn`)."""

from .region import RegionForward
from .rnn import StructuredGRU, StructuredLSTM, StructuredRNN
from .structured import RNNInput, StructuredChain, TileLinear, UnitDropout

__all__ = ["RegionForward", "StructuredChain", "TileLinear", "UnitDropout", "RNNInput", "StructuredRNN",
           "StructuredLSTM", "StructuredGRU"]
