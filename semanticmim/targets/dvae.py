"""Our own discrete VAE, trained when OpenAI's DALL-E weights are not at hand (BEiT's tokenizer).

The encoder *is* a `DalleTokenizer`, so a trained dVAE tokenizes exactly like an imported one
(`encoder_state_dict()` loads with `DalleTokenizer.from_state_dict`). The decoder mirrors OpenAI's
(1x1 conv from the codes, residual groups of decreasing width with 2x nearest upsampling, 1x1 conv out).

Training objective (DALL-E stage 1, simplified):
    z ~ GumbelSoftmax(logits, tau)            relaxed one-hot codes, hard=False
    recon = MSE(decoder(z), x)                x in [0, 1]; the decoder predicts [0, 1] pixels directly
    loss  = recon + kl_weight * KL(q(z|x) || uniform)   per grid position, averaged
MSE on [0, 1] pixels replaces OpenAI's logit-Laplace likelihood: one output per channel, no clamping
inside the loss, and stable from the first step at tiny scale. Everything runs in fp32, also under
autocast: the encoder is the tokenizer, whose argmax must not depend on the precision. `tau` is annealed
by the training loop with `temperature_schedule` (OpenAI: 1 -> 1/16); `codebook_perplexity` tracks how
many codes are used.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn

from semanticmim.errors import InputError
from semanticmim.targets.dalle import DalleTokenizer, DalleTokenizerConfig, EncoderBlock, make_conv

__all__ = ["DVAEConfig", "DalleDecoder", "DecoderBlock", "DiscreteVAE", "codebook_perplexity", "temperature_schedule"]

SCHEDULES = ("exponential", "cosine")


def temperature_schedule(
    step: int, total_steps: int, start: float = 1.0, end: float = 1 / 16, kind: str = "exponential"
) -> float:
    """Gumbel-softmax temperature at `step`: `start` at 0, `end` from `total_steps` on.

    "exponential" interpolates log(tau) linearly; "cosine" follows a half cosine from start to end.
    """
    if kind not in SCHEDULES:
        raise InputError(f"temperature schedule kind: expected one of {SCHEDULES}, got {kind!r}")
    if start <= 0 or end <= 0 or total_steps < 1:
        raise InputError(
            f"temperature schedule: need start, end > 0 and total_steps >= 1, got {start}, {end}, {total_steps}"
        )
    progress = min(max(step, 0) / total_steps, 1.0)
    if kind == "exponential":
        return start * (end / start) ** progress
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def codebook_perplexity(logits: torch.Tensor) -> torch.Tensor:
    """logits: (B, V, h, w) -> scalar exp(entropy) of the argmax code histogram over all positions.

    1 when every position picks the same code, V when all codes are used equally often.
    """
    vocab_size = logits.shape[1]
    counts = torch.bincount(logits.detach().argmax(dim=1).flatten(), minlength=vocab_size)
    usage = counts.float() / counts.sum()
    entropy = -(usage * torch.log(usage.clamp_min(1e-12))).sum()
    return entropy.exp()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """logits: (B, V, h, w) -> scalar mean over positions of KL(softmax(logits) || uniform(V))."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------- decoder


class DecoderBlock(EncoderBlock):
    """OpenAI's decoder block: the encoder's residual block with kernel sizes 1, 3, 3, 3."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers, kernel_sizes=(1, 3, 3, 3))


class DalleDecoder(nn.Module):
    """Codes (B, V, h, w) -> pixels (B, 3, h * ds, w * ds); widths n_hid * 2^(G-1), ..., n_hid."""

    def __init__(self, config: DalleTokenizerConfig) -> None:
        super().__init__()
        n_layers = config.group_count * config.n_blk_per_group
        n_init = max(config.n_hid // 2, 4)  # OpenAI: 128 for n_hid 256
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=make_conv(config.vocab_size, n_init, 1))
        n_in = n_init
        for group in range(config.group_count):
            width = config.group_width(config.group_count - 1 - group)
            stage: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(config.n_blk_per_group):
                stage[f"block_{i + 1}"] = DecoderBlock(n_in if i == 0 else width, width, n_layers)
            if group < config.group_count - 1:
                stage["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            layers[f"group_{group + 1}"] = nn.Sequential(stage)
            n_in = width
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=make_conv(n_in, 3, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, V, h, w) one-hot or relaxed -> (B, 3, h * ds, w * ds) predicted [0, 1] pixels."""
        return self.blocks(codes)


# ------------------------------------------------------------------------------------------------ dVAE


@dataclass(frozen=True)
class DVAEConfig(DalleTokenizerConfig):
    """DiscreteVAE's constructor arguments: its encoder's (the tokenizer's) shape plus the training image side
    and the loss settings; stored in saved models (see `models.factory`). The annotations are what pydantic
    checks where a params file sets these fields."""

    image_size: PositiveInt | None = None
    kl_weight: NonNegativeFloat = 0.01
    temperature: PositiveFloat = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DVAEConfig:
        return cls(**values)


class DiscreteVAE(nn.Module):
    """dVAE with a `DalleTokenizer` encoder, trained with the Gumbel-softmax relaxation.

    Args:
        vocab_size, n_hid, group_count, n_blk_per_group: the encoder's (and mirrored decoder's) shape;
            the token grid is image_size / 2^(group_count - 1) per side.
        image_size: optional side of the training images, checked against the downsampling here.
        kl_weight: weight of KL(q(z|x) || uniform) in the loss. At tiny scale (16 px, 64 codes) 0.01 gave
            perplexity ~32 of 64, 0 gave ~6 (few codes used), 0.05 pulled q to uniform (no information).
        temperature: Gumbel-softmax tau used by `forward` when none is passed (the loop anneals it).
    """

    checkpoint_kind = "dvae"  # the name `load_model` rebuilds it from

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        group_count: int = 4,
        n_blk_per_group: int = 2,
        image_size: int | None = None,
        kl_weight: float = 0.01,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = DalleTokenizer(vocab_size, n_hid, group_count, n_blk_per_group)
        self.decoder = DalleDecoder(self.encoder.config)
        downsample = self.encoder.downsample
        if image_size is not None and (image_size < downsample or image_size % downsample):
            raise InputError(
                f"image_size {image_size} is not a positive multiple of the token grid downsampling {downsample} "
                f"(group_count {group_count})"
            )
        if kl_weight < 0 or temperature <= 0:
            raise InputError(f"kl_weight must be >= 0 and temperature > 0, got {kl_weight} and {temperature}")
        self.image_size = image_size
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.config = DVAEConfig(vocab_size, n_hid, group_count, n_blk_per_group, image_size, kl_weight, temperature)

    @classmethod
    def from_config(cls, config: DVAEConfig) -> DiscreteVAE:
        return cls(**config.to_dict())

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def forward(
        self, images: torch.Tensor, temperature: float | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: (B, 3, H, W) in [0, 1] -> (loss, stats).

        stats holds detached scalars: loss, recon (MSE), kl, perplexity, temperature.
        """
        tau = self.temperature if temperature is None else temperature
        if tau <= 0:
            raise InputError(f"Gumbel-softmax temperature must be > 0, got {tau}")
        logits = self.encoder.logits(images)
        codes = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        recon = F.mse_loss(self.decode(codes), images.float())
        kl = kl_to_uniform(logits)
        loss = recon + self.kl_weight * kl
        stats = {
            "loss": loss.detach(),
            "recon": recon.detach(),
            "kl": kl.detach(),
            "perplexity": codebook_perplexity(logits),
            "temperature": torch.tensor(float(tau), device=loss.device),
        }
        return loss, stats

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, V, h, w) one-hot or relaxed -> (B, 3, h * ds, w * ds) predicted pixels, fp32."""
        with torch.autocast(codes.device.type, enabled=False):
            return self.decoder(codes.float())

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) decoded from the argmax tokens, clamped to [0, 1]."""
        tokens = self.encoder.logits(images).argmax(dim=1)
        return self.decode(F.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2)).clamp(0, 1)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The tokenizer's weights, loadable with `DalleTokenizer.from_state_dict`."""
        return self.encoder.state_dict()
