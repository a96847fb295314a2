"""What every stage records next to its outputs so any number can be traced to what produced it."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from semanticmim.engine.distributed import DistEnv
from stages.environment import lock_sha256
from stages.params import repo_root_of

PACKAGES = ("semanticmim", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "dvclive")


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def run_info(stage: str, params: dict, params_file: Path, env: DistEnv) -> dict:
    """The fully resolved configuration of a run (written as `run.json`)."""
    device = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "stage": stage,
        "params_file": str(params_file),
        "params": params,
        "versions": package_versions(),
        "git_commit": git_commit(repo_root_of(Path(params_file))),
        "device": {"type": env.device.type, "name": device, "torch_threads": torch.get_num_threads()},
        "world_size": env.world_size,
        "lock_sha256": lock_sha256(repo_root_of(Path(params_file))),
    }
