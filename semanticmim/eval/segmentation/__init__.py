"""Segmentation protocols of the paper's Table 1, one file each, on any timm-format ViT encoder.

- `linear.py`   PascalVOC linear segmentation [Table 6]: 1x1 conv on frozen block-6 patch tokens.
- `upernet.py`  ADE20K UperNet fine-tuning [Table 4]: feature pyramid from blocks 4/6/8/12 + `decoder.py`.
- `miou.py`     mIoU from a dataset-level confusion matrix; `inference.py` whole/sliding-window inference
  and the evaluation pass; `protocol.py` block scaling, the loss, views normalised with the encoder's
  mean/std, and the evaluation record and result both protocols share.
"""
