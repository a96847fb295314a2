"""Models: the proxy-token ViT encoder, MIM baselines and SemanticMIM, MoCo v3, and their factory."""

from semanticmim.models.factory import build_model, load_model, save_model
from semanticmim.models.masking import MaskGenerator, num_masked, random_mask
from semanticmim.models.mim import MaskedImageModel, MIMConfig
from semanticmim.models.mocov3 import MoCoConfig, MoCoV3
from semanticmim.models.vit import EncoderConfig, EncoderShape, ProxyViT

__all__ = [
    "EncoderConfig",
    "EncoderShape",
    "MIMConfig",
    "MaskGenerator",
    "MaskedImageModel",
    "MoCoConfig",
    "MoCoV3",
    "ProxyViT",
    "build_model",
    "load_model",
    "num_masked",
    "random_mask",
    "save_model",
]
