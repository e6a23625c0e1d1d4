"""The fx pass, one step per file: trace (model -> graphs), find (graph -> dropout sites and a plan),
rewrite (plan -> converted graph). :mod:`fxdrop.convert` strings them together."""
