"""Stage `probe-curve@VARIANT`: the linear probe (`eval.linear_cls`) of every encoder snapshot a pretraining
saved (`pretrain.snapshot_every`) -> runs/eval/VARIANT/probe_curve/: `epoch_NNNN/` (each probe's own run),
`curve.tsv` (epoch, top1_cls, top1_patch: a DVC plot), `metrics.json` (the same numbers per epoch) and
`run.json`. With cached features (the default and mini profiles) a probe costs one backbone pass, so a
reader sees whether a gap between variants is closing or opening.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.progress import write_json_atomic
from semanticmim.errors import InputError
from stages import evaluate
from stages.common import run_info

SNAPSHOT = re.compile(r"epoch_(\d+)$")
COLUMNS = ("top1_cls", "top1_patch")


def snapshot_epochs(snapshots: Path) -> dict[int, Path]:
    """{epoch: its timm export folder} of `snapshots/epoch_NNNN/`, in epoch order."""
    if not snapshots.is_dir():
        raise InputError(f"{snapshots}: no snapshots folder; pretrain with pretrain.snapshot_every > 0 first")
    found = {int(m.group(1)): path for path in snapshots.iterdir() if (m := SNAPSHOT.match(path.name))}
    if not found:
        raise InputError(f"{snapshots}: holds no epoch_NNNN snapshot; set pretrain.snapshot_every > 0 and rerun "
                         "the pretraining")
    return dict(sorted(found.items()))


def probe_values(metrics: dict) -> dict[str, float]:
    """top1_cls / top1_patch of a linear probe's metrics, whichever mode (`cached`, `paper`) made them."""
    for group in (metrics, *(metrics.get(mode) or {} for mode in ("cached", "paper"))):
        values = {key: float(group[key]) for key in COLUMNS if isinstance(group.get(key), int | float)}
        if values:
            return values
    return {}


def write_curve(path: Path, curve: dict[int, dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(("epoch", *COLUMNS))
        for epoch, values in curve.items():
            writer.writerow((epoch, *(f"{values[c]:.4f}" if c in values else "" for c in COLUMNS)))
    tmp.replace(path)


def run(snapshots: Path, params_file: Path, out_dir: Path, quiet: bool = False, device: str = "auto",
        discard_stale: bool = False) -> dict[int, dict[str, float]]:
    """Probe every snapshot; -> {epoch: {"top1_cls", "top1_patch"}}."""
    epochs = snapshot_epochs(Path(snapshots))
    curve = {}
    for epoch, encoder_dir in epochs.items():
        results = evaluate.run("linear_cls", encoder_dir, None, None, params_file, out_dir / f"epoch_{epoch:04d}",
                               quiet, device, discard_stale)
        curve[epoch] = probe_values(results["metrics"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_curve(out_dir / "curve.tsv", curve)
    write_json_atomic(out_dir / "metrics.json", {f"epoch_{epoch:04d}": values for epoch, values in curve.items()})
    write_json_atomic(out_dir / "run.json", run_info("probe-curve", {"snapshots": str(snapshots),
                                                                     "epochs": list(curve)}, params_file, DistEnv()))
    return curve
