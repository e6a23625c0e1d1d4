"""The experiment harness, apart from the core: the ``fxdrop`` command line (:mod:`.cli`: ``audit``,
``demo``, ``bench``, ``build``), the demo, the timing protocol and machine records, the dataset loaders
(:mod:`.data`: MNIST and the Penn Treebank from their registry packages), and the reference models every
benchmark, example and test imports (:mod:`.models`: the paper's MNIST MLP and the PTB word LM, with
:mod:`.ptb` for the language model's data and training step). It imports the core; the core never
imports it."""
