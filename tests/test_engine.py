"""The training engine: outputs, bitwise resume after SIGKILL, atomic checkpoints, accumulation,
torchrun, NaN and Ctrl-C handling, and refusing foreign checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from semanticmim.data.embedded import generate_embedded
from semanticmim.engine import checkpoint as checkpoint_module
from semanticmim.engine.checkpoint import list_checkpoints, save_checkpoint
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import (
    RunOptions,
    Schedule,
    TrainingDiverged,
    accumulate,
    clip_and_step,
    plan_batches,
    train,
)
from semanticmim.errors import InputError
from semanticmim.methods import build_variant
from semanticmim.methods.tasks import MIMTask, MoCoTask
from semanticmim.models import EncoderConfig, MaskGenerator
from semanticmim.models.mocov3 import momentum_at
from semanticmim.targets import HOGTarget
from stages import pretrain

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(root / "data", image_size=32, train=64, val=16, seed=0, workers=1)
    return root / "data" / "classification"


def write_params(folder: Path, root: Path, **overrides) -> Path:
    pretrain_section = {
        "model": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "data": {"root": str(root), "num_workers": 0},
        "run": {"checkpoint_every": 2, "log_every": 1, "keep_checkpoints": 2},
        "recipe": {"drop_path": 0.1, "epochs": 2, "batch_size": 16, "lr": 1e-3, "lr_batch": 16,
                   "warmup_epochs": 0.5, "mlp_dim": 64, "out_dim": 16},
    }
    for key, value in overrides.items():
        section = pretrain_section
        if "." not in key and key not in pretrain_section:
            key = f"recipe.{key}"  # a recipe field
        *parents, last = key.split(".")
        for parent in parents:
            section = section[parent]
        section[last] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": pretrain_section}))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------------------- outputs


def test_pretrain_writes_every_output(dataset_root, tmp_path):
    params = write_params(tmp_path, dataset_root)
    metrics = pretrain.run("maskfeat-semanticmim", params, tmp_path / "run", quiet=True, device="cpu")
    out = tmp_path / "run"
    assert metrics["steps"] == 8 and metrics["img_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == pytest.approx(metrics["final_loss"])
    info = json.loads((out / "run.json").read_text())
    assert info["batch_plan"] == {**info["batch_plan"], "per_device_batch": 16, "world_size": 1, "accumulation": 1,
                                  "global_batch": 16, "steps_per_epoch": 4, "total_steps": 8}
    recipe = info["params"]["resolved_recipe"]
    assert recipe["mask_ratio"] == 0.6 and recipe["num_proxy"] == 8
    assert info["versions"]["torch"] and info["world_size"] == 1
    assert len(list_checkpoints(out / "checkpoints")) == 2  # keep_checkpoints
    losses = (out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(losses) == 1 + 8
    first, last = float(losses[1].split("\t")[-1]), float(losses[-1].split("\t")[-1])
    assert last < first  # HOG regression learns from the first steps
    config = json.loads((out / "encoder" / "config.json").read_text())
    assert config["kwargs"]["reg_tokens"] == 7
    assert (out / "model.safetensors").is_file()


def test_effective_batch_is_made_up_by_accumulation():
    schedule = Schedule(epochs=1, batch_size=8, effective_batch=32, lr=1e-3, min_lr=0, warmup_epochs=0,
                        weight_decay=0.05)
    plan = plan_batches(schedule, 256, world_size=2)
    assert (plan.accumulation, plan.global_batch, plan.steps_per_epoch) == (2, 32, 8) and not plan.notes
    odd = plan_batches(Schedule(**{**vars(schedule), "effective_batch": 44}), 256, world_size=2)
    assert odd.global_batch == 48 and "differs from the recipe's 44" in odd.notes[0]
    with pytest.raises(InputError, match="fewer than one global batch"):
        plan_batches(schedule, 16, world_size=1)


# ------------------------------------------------------------------------------------------- resume


def run_cli(params: Path, out: Path, variant: str = "maskfeat-semanticmim") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages", "pretrain", variant, "--params", str(params),
                             "--out", str(out), "--quiet", "--device", "cpu"], env=SUBPROCESS_ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def shards_root(dataset_root, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path_factory.mktemp("shards") / "train"
    result = CliRunner().invoke(app, ["data", "prepare", "imagefolder", str(dataset_root), "--shards", "--out",
                                      str(out), "--max-side", "32"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_resume_after_sigkill_is_bitwise_identical(dataset_root, shards_root, tmp_path, source):
    overrides = {"run.keep_checkpoints": 50}
    if source == "shards":  # a stream cannot seek: resuming replays the epoch's first batches
        overrides.update({"data.format": "shards", "data.root": str(shards_root)})
    params = write_params(tmp_path, dataset_root, epochs=8, **overrides)
    uninterrupted = run_cli(params, tmp_path / "full")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()

    killed = run_cli(params, tmp_path / "resumed")
    deadline = time.time() + 300
    while not list_checkpoints(tmp_path / "resumed" / "checkpoints") and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed" / "model.safetensors").exists(), "the run finished before the kill"
    resumed = run_cli(params, tmp_path / "resumed")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert_bitwise_equal(weights(tmp_path / "full" / "model.safetensors"),
                         weights(tmp_path / "resumed" / "model.safetensors"))


def test_interrupted_checkpoint_write_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    model = build_variant("maskfeat", EncoderConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    good = save_checkpoint(tmp_path, 2, model, optimizer, {"variant": "maskfeat", "loss": 1.0}, keep=3)

    def die_mid_write(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL between two files of the checkpoint

    monkeypatch.setattr(checkpoint_module, "save_file", die_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model, optimizer, {"variant": "maskfeat", "loss": 1.0}, keep=3)
    assert list_checkpoints(tmp_path) == [good]
    assert (tmp_path / ".tmp-step_00000004").exists()  # the partial write is left aside, never read


# ------------------------------------------------------------------------------------ foreign checkpoints


def test_checkpoint_of_another_variant_or_architecture_is_refused(dataset_root, tmp_path):
    params = write_params(tmp_path, dataset_root, epochs=1)
    pretrain.run("maskfeat", params, tmp_path / "run", quiet=True, device="cpu")
    with pytest.raises(InputError, match="checkpoint has variant='maskfeat' but this run has variant='mocov3'"):
        pretrain.run("mocov3", params, tmp_path / "run", quiet=True, device="cpu")
    wider = write_params(tmp_path, dataset_root, epochs=1, **{"model.embed_dim": 64})
    with pytest.raises(InputError, match="checkpoint is of another architecture") as error:
        pretrain.run("maskfeat", wider, tmp_path / "run", quiet=True, device="cpu")
    assert "\n" not in str(error.value)
    other_lr = write_params(tmp_path, dataset_root, epochs=1, lr=5e-4)
    with pytest.raises(InputError, match="written with other training settings"):
        pretrain.run("maskfeat", other_lr, tmp_path / "run", quiet=True, device="cpu")
    # what dvc.yaml asks for: a params change starts afresh instead of resuming stale weights
    metrics = pretrain.run("maskfeat", other_lr, tmp_path / "run", quiet=True, device="cpu", discard_stale=True)
    assert metrics["steps"] == 4 and metrics["img_per_s"] > 0  # trained 4 new steps, resumed none
    assert json.loads((tmp_path / "run" / "run.json").read_text())["params"]["resolved_recipe"]["lr"] == 5e-4


# ---------------------------------------------------------------------------- accumulation and failures


def tiny_mim_task(drop_path: float = 0.0) -> MIMTask:
    torch.manual_seed(0)
    encoder = EncoderConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, drop_path=drop_path)
    model = build_variant("maskfeat-semanticmim", encoder, num_proxy=2, target_dim=HOGTarget(9, 4, 8, 8).out_dim)
    return MIMTask("maskfeat-semanticmim", model, hog=HOGTarget(9, 4, 8, 8))


def test_accumulation_of_4x8_matches_one_batch_of_32():
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    visible, masked = MaskGenerator(4, 0.5)(32, torch.Generator().manual_seed(0))
    env, options = DistEnv(), RunOptions()
    results = []
    for chunks in (1, 4):
        task = tiny_mim_task()
        optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
        labels = torch.zeros(32, dtype=torch.long).chunk(chunks)
        group = [((i, v, m), y) for i, v, m, y in zip(images.chunk(chunks), visible.chunk(chunks),
                                                         masked.chunk(chunks), labels, strict=True)]
        loss = accumulate(task, task.model, task.model, group, 0, env, options)
        clip_and_step(task.model, optimizer, clip_grad=None)
        results.append((loss, task.model.state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, tensor in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


class ScriptedTask:
    """A MIM task whose step `fail_at` returns NaN or raises KeyboardInterrupt."""

    def __init__(self, fail_at: int, failure: str) -> None:
        self.inner, self.fail_at, self.failure = tiny_mim_task(), fail_at, failure
        self.name, self.model = "maskfeat-semanticmim", self.inner.model

    def to(self, device):
        return self

    def loss(self, module, batch, step):
        loss = self.inner.loss(module, batch, step)
        if step == self.fail_at and self.failure == "nan":
            return loss * float("nan")
        if step == self.fail_at:
            raise KeyboardInterrupt
        return loss


def random_masked_dataset(size: int = 64):
    images = torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8)
    visible, masked = MaskGenerator(4, 0.5)(size, torch.Generator().manual_seed(0))
    samples = torch.utils.data.StackDataset(images, visible, masked)
    return torch.utils.data.StackDataset(samples, torch.zeros(size, dtype=torch.long))


@pytest.mark.parametrize("failure", ["nan", "interrupt"])
def test_nan_and_ctrl_c_keep_a_checkpoint(failure, tmp_path):
    schedule = Schedule(epochs=2, batch_size=8, effective_batch=8, lr=1e-3, min_lr=0, warmup_epochs=0,
                        weight_decay=0.05)
    options = RunOptions(checkpoint_every=2 if failure == "nan" else 100, num_workers=0, quiet=True)
    task = ScriptedTask(fail_at=5, failure=failure)
    expected = TrainingDiverged if failure == "nan" else KeyboardInterrupt
    with pytest.raises(expected, match="loss is nan at step 5" if failure == "nan" else None):
        train(task, random_masked_dataset(), schedule, options, DistEnv(), tmp_path)
    saved = [path.name for path in list_checkpoints(tmp_path / "checkpoints")]
    # NaN: the last good periodic checkpoint (step 4) stays; Ctrl-C: saved at the last completed step
    assert saved[-1] == "step_00000004" if failure == "nan" else saved == ["step_00000005"]
    assert not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_match_one(dataset_root, tmp_path):
    """Same global batch 16: 1 process x 16 vs 2 processes x 8 (gloo). No drop-path (its random draws
    are per process); masks and augmentations are per sample, so both runs see the same batches."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = write_params(tmp_path / "one", dataset_root, **{"drop_path": 0.0})
    double = write_params(tmp_path / "two", dataset_root, batch_per_device=8, **{"drop_path": 0.0})
    one = run_cli(single, tmp_path / "one" / "run", variant="maskfeat")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "stages", "pretrain",
                          "maskfeat", "--params", str(double), "--out", str(tmp_path / "two" / "run"), "--quiet",
                          "--device", "cpu"], env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    run_one = json.loads((tmp_path / "one" / "run" / "run.json").read_text())["batch_plan"]
    run_two = json.loads((tmp_path / "two" / "run" / "run.json").read_text())["batch_plan"]
    assert (run_one["global_batch"], run_two["global_batch"], run_two["world_size"]) == (16, 16, 2)
    loss_one = json.loads((tmp_path / "one" / "run" / "metrics.json").read_text())["final_loss"]
    loss_two = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())["final_loss"]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    a = weights(tmp_path / "one" / "run" / "model.safetensors")
    b = weights(tmp_path / "two" / "run" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    """Rank 1 dies before a collective; torchrun must end the job with an error, not wait forever."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import torch\n"
        "from semanticmim.engine import distributed\n"
        "env = distributed.setup('cpu')\n"
        "if env.rank == 1:\n"
        "    raise SystemExit('rank 1 fails')\n"
        "distributed.all_reduce_mean(torch.ones(1))\n")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    start = time.time()
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], env=SUBPROCESS_ENV,
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and "rank 1 fails" in result.stdout + result.stderr
    assert time.time() - start < 200


def test_mocov3_momentum_moves_once_per_optimizer_step_under_accumulation(dataset_root, tmp_path, monkeypatch):
    """With accumulation 4 the momentum encoder is updated once per optimizer step (m, not m^4): after the
    run, its weights equal m·old + (1 − m)·online replayed once per step from the checkpoints."""
    params = write_params(tmp_path, dataset_root, epochs=1, batch_size=16, batch_per_device=4,
                          **{"run.checkpoint_every": 1, "run.keep_checkpoints": 10})
    calls = []
    original = MoCoTask.before_step
    monkeypatch.setattr(MoCoTask, "before_step", lambda self, step: (calls.append(step), original(self, step)))
    metrics = pretrain.run("mocov3", params, tmp_path / "run", quiet=True, device="cpu")
    assert metrics["steps"] == 4 and calls == [0, 1, 2, 3]
    plan = json.loads((tmp_path / "run" / "run.json").read_text())["batch_plan"]
    assert plan["accumulation"] == 4
    steps = [weights(path / "model.safetensors") for path in list_checkpoints(tmp_path / "run" / "checkpoints")]
    for before, after, step in zip(steps, steps[1:], (1, 2, 3), strict=False):
        m = momentum_at(step, 4, 0.99)
        name = "momentum_encoder.blocks.0.mlp.fc1.weight"
        online = before["encoder.blocks.0.mlp.fc1.weight"]
        torch.testing.assert_close(after[name], m * before[name] + (1 - m) * online, rtol=0, atol=1e-7)
