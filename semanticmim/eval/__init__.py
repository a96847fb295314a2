"""Evaluation protocols of the paper's Table 1, one file per protocol, on any timm-format ViT encoder."""
