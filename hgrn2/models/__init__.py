"""Backbones built from hgrn2.layers: causal LM, vision (timm-registered) and Long Range Arena encoders."""
