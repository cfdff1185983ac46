"""HGRN2 building blocks: token mixers, the GLU channel mixer, norms, the lower-bound schedule, the short
convolutions, blocks."""

from hgrn2.layers.block import Block, run_blocks
from hgrn2.layers.directional import BidirectionalHGRU2, HGRU2d
from hgrn2.layers.glu import GLU
from hgrn2.layers.hgru1 import HGRU1
from hgrn2.layers.hgru2 import HGRU2
from hgrn2.layers.lower_bound import LayerLowerBounds, lower_bound_schedule
from hgrn2.layers.norm import NORMS, RMSNorm, add_and_norm, make_norm, runs_fused_kernels
from hgrn2.layers.short_conv import GridConvolution, ShortConvolution

__all__ = [
    "GLU",
    "GridConvolution",
    "HGRU1",
    "HGRU2",
    "NORMS",
    "BidirectionalHGRU2",
    "Block",
    "HGRU2d",
    "LayerLowerBounds",
    "RMSNorm",
    "ShortConvolution",
    "add_and_norm",
    "lower_bound_schedule",
    "make_norm",
    "run_blocks",
    "runs_fused_kernels",
]
