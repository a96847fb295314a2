"""Stage `dvae`: params.yaml `dvae` section -> runs/dvae/ (our own BEiT tokenizer).

Outputs: tokenizer.safetensors (the encoder, a `DalleTokenizer`: what BEiT pretraining reads),
model.safetensors (encoder + decoder, for drawing reconstructions), checkpoints/, metrics.json with the
held-out reconstruction error and codebook perplexity, run.json, dvclive/ curves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from semanticmim.config import DVAEParams, load_section, resolve_path
from semanticmim.data.layouts import ClassificationDataset, read_imagefolder
from semanticmim.data.transforms import TokenizerView, unit_range
from semanticmim.engine import distributed
from semanticmim.engine.loop import RunOptions, Schedule, train
from semanticmim.engine.progress import write_json_atomic
from semanticmim.engine.tasks import DVAETask, to_device
from semanticmim.targets.dvae import DiscreteVAE, codebook_perplexity
from stages.common import run_info


@torch.no_grad()
def held_out_metrics(model: DiscreteVAE, dataset, device: torch.device, limit: int = 512) -> dict:
    """Reconstruction MSE of the argmax tokens, its ratio to the pixel variance (1 = no better than the
    mean image), and the codebook perplexity, on up to `limit` validation images."""
    model.eval()
    batches = zip(DataLoader(dataset, 64), range(limit // 64 + 1), strict=False)
    images = unit_range(torch.cat([to_device(batch, device)[0] for batch, _ in batches])[:limit])
    mse = torch.nn.functional.mse_loss(model.reconstruct(images), images).item()
    return {"val_recon_mse": mse, "val_recon_vs_variance": mse / images.var().item(),
            "val_perplexity": codebook_perplexity(model.encoder.logits(images)).item()}


def run(params_file: Path, out_dir: Path, quiet: bool = False, device: str = "auto",
        discard_stale: bool = False) -> dict:
    params: DVAEParams = load_section(params_file, "dvae")
    env = distributed.setup(device)
    try:
        root = resolve_path(params.data.root, params_file)
        view = TokenizerView(params.image_size, params.crop_scale)
        train_set = ClassificationDataset(read_imagefolder(root, params.data.train_split), view,
                                          skip_report=out_dir / "skipped.jsonl", lazy_decode=True)
        schedule = Schedule(epochs=params.epochs, batch_size=params.batch_size, effective_batch=params.batch_size
                            * env.world_size, lr=params.lr, min_lr=params.min_lr, warmup_epochs=params.warmup_epochs,
                            weight_decay=params.weight_decay)
        torch.manual_seed(params.run.seed)
        model = DiscreteVAE(params.vocab_size, params.n_hid, params.group_count, params.n_blk_per_group,
                            params.image_size, params.kl_weight, params.temperature_start)
        steps = params.epochs * (len(train_set) // (params.batch_size * env.world_size))
        task = DVAETask("dvae", model, steps, params.temperature_start, params.temperature_end)
        options = RunOptions(**{**params.run.model_dump(), "discard_stale": discard_stale or params.run.discard_stale},
                             num_workers=params.data.num_workers, quiet=quiet)
        settings = hashlib.sha256(json.dumps({**params.model_dump(mode="json"), "root": str(root)},
                                             sort_keys=True).encode()).hexdigest()[:16]
        info = run_info("dvae", params.model_dump(mode="json"), params_file, env)
        metrics = train(task, train_set, schedule, options, env, out_dir, info, settings)
        if env.is_main:
            model.encoder.save_safetensors(out_dir / "tokenizer.safetensors")
            val_set = ClassificationDataset(read_imagefolder(root, params.data.val_split),
                                            TokenizerView(params.image_size, (1.0, 1.0), flip=0.0))
            metrics.update(held_out_metrics(model, val_set, env.device))
            write_json_atomic(out_dir / "metrics.json", metrics)
        return metrics
    finally:
        distributed.teardown()
