"""Pretraining targets: MaskFeat's HOG features and BEiT's DALL-E visual tokens (imported or self-trained)."""

from semanticmim.targets.dalle import (
    DalleTokenizer,
    DalleTokenizerConfig,
    import_openai_pickle,
    map_pixels,
    read_openai_pickle,
)
from semanticmim.targets.dvae import DiscreteVAE, codebook_perplexity, temperature_schedule
from semanticmim.targets.hog import HOGTarget

__all__ = [
    "DalleTokenizer",
    "DalleTokenizerConfig",
    "DiscreteVAE",
    "HOGTarget",
    "codebook_perplexity",
    "import_openai_pickle",
    "map_pixels",
    "read_openai_pickle",
    "temperature_schedule",
]
