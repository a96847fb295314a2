"""`semanticmim bench`: every speed measurement in one place, each against a baseline in the same run.

- `steps`: training-step speed of every variant against timm's ViT (model FLOPs, MFU).
- `pipeline`: whole training steps through the real pretrain stage, with the share of time per phase.
- `data`: decode + augmentation throughput of every data pipeline per CPU core.
- `photos`: ImageNet-like JPEGs from scikit-image's bundled photographs (no download).
"""
