"""MoCo v3 against the official ViT recipe (facebookresearch/moco-v3): the predictor's affine-free
last BatchNorm, one momentum update per optimizer step (never inside `forward`), the official
update-then-keys order, and SyncBatchNorm only under DDP on CUDA. Tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semanticmim.models.mocov3 import MoCoConfig, MoCoV3, convert_sync_batchnorm, momentum_at
from semanticmim.models.vit import EncoderConfig

TINY = EncoderConfig(block="vit", num_proxy=1, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_moco(seed: int = 0) -> MoCoV3:
    torch.manual_seed(seed)
    return MoCoV3(MoCoConfig(encoder=TINY, mlp_dim=64, out_dim=16)).train()


def views(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randn(batch, 3, 32, 32, generator=generator)


def momentum_snapshot(model: MoCoV3) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.momentum_parameters()]


def perturb_online(model: MoCoV3) -> None:
    """Make online and momentum weights differ, as they do after the first optimizer step."""
    with torch.no_grad():
        for param in model.online_parameters():
            param.add_(torch.randn_like(param) * 0.1)


# ------------------------------------------------------------------------------------ architecture


def test_predictor_ends_with_an_affine_free_batchnorm_like_the_official_vit_builder():
    model = tiny_moco()
    for mlp, layers in ((model.projector, 3), (model.predictor, 2)):
        last = mlp[-1]
        assert isinstance(last, nn.BatchNorm1d) and not last.affine
        assert sum(isinstance(m, nn.Linear) for m in mlp) == layers
        assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))


# ------------------------------------------------------------------------------- momentum update


def test_forward_leaves_the_momentum_parameters_alone():
    model = tiny_moco()
    perturb_online(model)
    before = momentum_snapshot(model)
    for seed in range(2):  # two micro-batches of one accumulated step
        model(*views(seed)).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_parameters(), strict=True))


def test_forward_with_a_momentum_still_updates_for_callers_not_yet_switched():
    model = tiny_moco()
    perturb_online(model)
    expected = [0.5 * old + 0.5 * online.detach()
                for old, online in zip(momentum_snapshot(model), model.online_parameters(), strict=True)]
    model(*views(0), momentum=0.5)
    for new, want in zip(model.momentum_parameters(), expected, strict=True):
        torch.testing.assert_close(new, want)


def test_update_momentum_is_the_exponential_moving_average():
    model = tiny_moco()
    perturb_online(model)
    old, online = momentum_snapshot(model), [p.detach().clone() for p in model.online_parameters()]
    assert len(old) == len(online) and all(a.shape == b.shape for a, b in zip(old, online, strict=True))
    model.update_momentum(1.0)
    assert all(torch.equal(a, b) for a, b in zip(old, model.momentum_parameters(), strict=True))
    model.update_momentum(0.75)
    for before, new, current in zip(old, model.momentum_parameters(), online, strict=True):
        assert torch.equal(new, 0.75 * before + 0.25 * current)
    model.update_momentum(0.0)
    assert all(torch.equal(a, b) for a, b in zip(online, model.momentum_parameters(), strict=True))


def test_before_step_applies_the_scheduled_momentum_once():
    model = tiny_moco()
    perturb_online(model)
    old, online = momentum_snapshot(model), [p.detach().clone() for p in model.online_parameters()]
    m = model.before_step(3, 10, base_momentum=0.9)
    assert m == momentum_at(3, 10, 0.9)
    for before, new, current in zip(old, model.momentum_parameters(), online, strict=True):
        assert torch.equal(new, m * before + (1 - m) * current)


# ------------------------------------------------------------- the official order, written out


def official_iteration(model: MoCoV3, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
    """One iteration of the official `MoCo.forward(x1, x2, m)`, restated on our modules: queries
    through the online encoder + head + predictor; then, without gradient, every momentum weight
    becomes m·itself + (1−m)·its online twin (paired by name); then the keys; then each query view
    against the other view's keys, cross-entropy on the diagonal, times 2T."""
    t = model.config.temperature
    q1 = model.predictor(model.projector(model.encoder.forward_features(x1)[:, 0]))
    q2 = model.predictor(model.projector(model.encoder.forward_features(x2)[:, 0]))
    with torch.no_grad():
        for online, target in ((model.encoder, model.momentum_encoder), (model.projector, model.momentum_projector)):
            twins = dict(online.named_parameters())
            for name, weight in target.named_parameters():
                weight.copy_(weight * m + twins[name] * (1.0 - m))
        k1 = model.momentum_projector(model.momentum_encoder.forward_features(x1)[:, 0])
        k2 = model.momentum_projector(model.momentum_encoder.forward_features(x2)[:, 0])

    def info_nce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t  # the official einsum "nc,mc->nm"
        return F.cross_entropy(logits, torch.arange(logits.shape[0])) * (2 * t)

    return info_nce(q1, k2) + info_nce(q2, k1)


def official_momentum(step: int, total_steps: int, base: float) -> float:
    """The official `adjust_moco_momentum`: half a cosine from `base` up to 1 over training."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * (1.0 - base)


def test_update_then_forward_matches_the_official_order_step_by_step():
    ours, reference = tiny_moco(seed=3), tiny_moco(seed=3)
    steps, base = 4, 0.9
    optimizers = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
                  for model in (ours, reference)]
    for step in range(steps):
        x1, x2 = views(step)
        ours.before_step(step, steps, base)
        losses = [ours(x1, x2), official_iteration(reference, x1, x2, official_momentum(step, steps, base))]
        for loss, optimizer in zip(losses, optimizers, strict=True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    untrained = momentum_snapshot(tiny_moco(seed=3))
    assert not all(torch.equal(a, b) for a, b in zip(untrained, ours.momentum_parameters(), strict=True))
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ SyncBatchNorm


def batchnorm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_convert_sync_batchnorm_leaves_cpu_models_alone(tmp_path):
    model = tiny_moco()
    assert convert_sync_batchnorm(model, "cuda") is model  # no process group: nothing to sync with
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert convert_sync_batchnorm(model, torch.device("cpu")) is model
    finally:
        dist.destroy_process_group()
    assert batchnorm_types(model) == {nn.BatchNorm1d}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_sync_batchnorm_on_cuda_under_a_process_group(tmp_path):
    model = tiny_moco()
    keys, frozen = list(model.state_dict()), [n for n, p in model.named_parameters() if not p.requires_grad]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = convert_sync_batchnorm(model, torch.device("cuda")).cuda()
        assert batchnorm_types(model) == {nn.SyncBatchNorm}
        assert not model.predictor[-1].affine and list(model.state_dict()) == keys
        assert [n for n, p in model.named_parameters() if not p.requires_grad] == frozen
        loss = model(*(v.cuda() for v in views(0)))
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()
