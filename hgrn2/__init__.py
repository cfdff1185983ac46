"""hgrn2: HGRN2 gated linear RNNs with state expansion (Qin et al., COLM 2024)."""

__version__ = "0.1.0"

from hgrn2.models import vision  # noqa: F401, E402  (registers the timm models)
