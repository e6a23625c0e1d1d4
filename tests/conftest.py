"""Test-session setup: torchvision's registry wheel against the CPU torch (see fxdrop.harness.architectures).

It is imported first, declaring the two operator schemas its import needs when its C++ library cannot
load, so that transformers and timm (which import it) import too. Nothing else is set up here.
"""

import importlib.util

if importlib.util.find_spec("torchvision") is not None:
    from fxdrop.harness.architectures import Unavailable, import_torchvision

    try:
        import_torchvision()
    except Unavailable:
        pass
