"""hgrn2: HGRN2 gated linear RNNs with state expansion (Qin et al., COLM 2024)."""

__version__ = "0.1.0"
