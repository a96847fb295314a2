"""`semanticmim doctor`: check an environment before a long run, one line per check with what to fix.

Every check returns a `Check`; a failed one (`ok=False`) is something that would make the run fail or hang.
Checks that do not apply here (CUDA on a CPU host, an all-reduce in a single process) pass with a note.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet

from stages.environment import LockError, canonical_name, locked_versions

GIB = 1024**3
# DataLoader workers hand batches over through /dev/shm; Docker's default of 64 MiB fails at the first batch.
MIN_SHM_BYTES = 1 * GIB
MIN_FREE_DISK_BYTES = 5 * GIB
ALL_REDUCE_TIMEOUT_S = 20.0
DVC_SITE_CACHE_DEFAULT = Path("/var/tmp/dvc")
NVIDIA_CTL = Path("/dev/nvidiactl")
REINSTALL = 'pip install -c requirements.lock -e ".[dev]" (or rebuild the image)'


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(params_file: Path, lock_file: Path, *, root: Path | None = None) -> list[Check]:
    """All checks; relative paths in the params file are taken from `root` (the repo root, default: cwd)."""
    root = Path.cwd() if root is None else Path(root)
    checks = [check_packages(lock_file)]
    checks += check_cuda()
    checks.append(check_all_reduce())
    params, params_check = load_params(params_file)
    checks.append(params_check)
    checks.append(check_shm(max_num_workers(params)))
    checks.append(check_disk(root))
    checks += check_dvc_dirs(root)
    checks += check_dataset_roots(params, root)
    return checks


def exit_code(checks: list[Check]) -> int:
    return int(any(not c.ok for c in checks))


def format_report(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}"
        lines.append(line if c.ok or not c.fix else f"{line}  -> fix: {c.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks)} checks, {failed} failed" + ("" if failed else ": ready to run"))
    return "\n".join(lines)


# --- packages --------------------------------------------------------------------------------------------


def check_packages(lock_file: Path) -> Check:
    """Installed distributions that the lock pins must carry the locked version (a local label such as
    +cpu is the same release); locked packages that are not installed (nvidia-* on CPU) are fine."""
    try:
        pins = locked_versions(lock_file)
    except LockError as err:
        return Check("packages", False, str(err), "run from the repo root, or regenerate it: bash scripts/lock.sh")
    wrong = [
        f"{name} {version} (locked {pins[name]})"
        for name, version in sorted(installed_versions().items())
        if name in pins and not SpecifierSet(f"=={pins[name]}").contains(version, prereleases=True)
    ]
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        return Check("packages", False, f"{len(wrong)} differ from {Path(lock_file).name}: {shown}", REINSTALL)
    return Check("packages", True, f"installed versions match {Path(lock_file).name} ({len(pins)} pins)")


def installed_versions() -> dict[str, str]:
    return {canonical_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


# --- CUDA, cuDNN, NCCL -----------------------------------------------------------------------------------


def check_cuda() -> list[Check]:
    import torch

    built = torch.version.cuda
    if not torch.cuda.is_available():
        if NVIDIA_CTL.exists():
            why = f"this torch is built for CUDA {built}" if built else "this torch is a CPU-only build"
            return [Check("cuda", False, f"NVIDIA devices present but torch sees no GPU ({why})",
                          "match the driver to the torch build (nvidia-smi), or install the locked CUDA torch")]
        skipped = "skipped: no GPU visible"
        return [Check("cuda", True, f"{skipped} (CPU run; torch {torch.__version__})"),
                Check("cudnn", True, skipped), Check("nccl", True, skipped)]
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    cuda = Check("cuda", True, f"{torch.cuda.device_count()} GPU ({', '.join(names)}), CUDA {built}"
                 f"{driver_version_note()}, torch {torch.__version__}")
    return [cuda, check_cudnn(), check_nccl()]


def driver_version_note() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return f", driver {pynvml.nvmlSystemGetDriverVersion()}"
    except Exception:  # the driver version is informative only
        return ""


def check_cudnn() -> Check:
    import torch

    if not torch.backends.cudnn.is_available():
        return Check("cudnn", False, "cuDNN not loadable by torch", REINSTALL)
    version = torch.backends.cudnn.version() or 0
    return Check("cudnn", True, f"cuDNN {version // 10000}.{version // 100 % 100}.{version % 100}")


def check_nccl() -> Check:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        return Check("nccl", False, "this torch has no NCCL backend: multi-GPU runs cannot start", REINSTALL)
    return Check("nccl", True, "NCCL " + ".".join(map(str, torch.cuda.nccl.version())))


# --- all-reduce across ranks -----------------------------------------------------------------------------

# Run in a child process so that a hung rendezvous or collective is killed after the timeout instead of
# leaving this process stuck in (or unable to tear down) a broken process group.
_ALL_REDUCE = """
import datetime, json, os, sys
import torch, torch.distributed as dist
backend, timeout = sys.argv[1], float(sys.argv[2])
device = torch.device("cpu")
if backend == "nccl":
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
value = torch.full((1,), float(dist.get_rank() + 1), device=device)
dist.all_reduce(value)
n = dist.get_world_size()
print(json.dumps({"rank": dist.get_rank(), "world_size": n, "sum": value.item(), "expected": n * (n + 1) / 2}))
dist.destroy_process_group()
"""


def check_all_reduce(env: Mapping[str, str] | None = None, timeout_s: float = ALL_REDUCE_TIMEOUT_S) -> Check:
    """A one-element all-reduce over every rank of this launch (torchrun's WORLD_SIZE, RANK, MASTER_ADDR...);
    catches a multi-node hang in seconds instead of at the first training step."""
    env = dict(os.environ if env is None else env)
    world_size = _int(env.get("WORLD_SIZE", "1"))
    if world_size is None or world_size < 1:
        return Check("all-reduce", False, f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not a positive integer",
                     "launch with torchrun, which sets WORLD_SIZE, RANK and MASTER_ADDR")
    if world_size == 1:
        return Check("all-reduce", True, "skipped: single process (WORLD_SIZE unset or 1)")
    backend = "nccl" if _cuda_available() else "gloo"
    where = f"{backend}, {world_size} ranks via {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    fix = ("start every rank (same --nnodes, --rdzv_endpoint reachable from all nodes); "
           "check firewall and NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME")
    try:
        done = subprocess.run([sys.executable, "-c", _ALL_REDUCE, backend, str(timeout_s)], env=env,
                              capture_output=True, text=True, timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        return Check("all-reduce", False, f"no answer from all ranks within {timeout_s:.0f} s ({where})", fix)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("all-reduce", False, f"failed ({where}): {last[:200]}", fix)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return Check("all-reduce", False, f"no result printed ({where})", fix)
    if result["sum"] != result["expected"]:
        return Check("all-reduce", False, f"wrong sum {result['sum']} != {result['expected']} ({where})", fix)
    return Check("all-reduce", True, f"rank {result['rank']}: all-reduce over {where} ok")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# --- params file -----------------------------------------------------------------------------------------


def load_params(params_file: Path) -> tuple[dict[str, Any], Check]:
    try:
        params = yaml.safe_load(Path(params_file).read_text())
    except OSError as err:
        return {}, Check("params", False, f"cannot read {params_file}: {err.strerror or err}",
                         "pass --params with an existing file (params.yaml, params/smoke.yaml, params/paper.yaml)")
    except yaml.YAMLError as err:
        return {}, Check("params", False, f"{params_file} is not valid YAML: {' '.join(str(err).split())[:160]}",
                         "fix the YAML syntax")
    if not isinstance(params, dict):
        return {}, Check("params", False, f"{params_file} is not a mapping of sections", "fix the file")
    return params, Check("params", True, f"{params_file}: sections {', '.join(map(str, params))}")


def lookup(params: Mapping[str, Any], dotted: str) -> Any:
    """`lookup(p, "pretrain.data.root")`; None when any part is missing."""
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def max_num_workers(params: Any) -> int:
    """The most DataLoader workers any section asks for (`num_workers` anywhere in the tree)."""
    return max((int(v) for v in _values_of(params, "num_workers") if isinstance(v, int)), default=0)


def _values_of(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values_of(v, key)


# --- shared memory and disk ------------------------------------------------------------------------------


def check_shm(num_workers: int, path: Path = Path("/dev/shm"), minimum: int = MIN_SHM_BYTES) -> Check:
    try:
        stat = os.statvfs(path)
    except OSError as err:
        size, detail = 0, f"{path}: {err.strerror or err}"
    else:
        size = stat.f_frsize * stat.f_blocks
        detail = f"{path} {size / GIB:.2f} GiB"
    if num_workers == 0:
        return Check("shm", True, f"{detail}; the params use no DataLoader workers")
    if size < minimum:
        return Check("shm", False, f"{detail} < {minimum / GIB:.0f} GiB for {num_workers} DataLoader workers",
                     "docker run --ipc=host (or --shm-size=8g); on SLURM, a node with a larger /dev/shm")
    return Check("shm", True, f"{detail} for {num_workers} DataLoader workers")


def check_disk(root: Path, minimum: int = MIN_FREE_DISK_BYTES) -> Check:
    where = nearest_existing(root)
    free = shutil.disk_usage(where).free
    detail = f"{free / GIB:.1f} GiB free at {where}"
    if free < minimum:
        return Check("disk", False, f"{detail} < {minimum / GIB:.0f} GiB",
                     "free space, or point the DVC cache at a larger disk: dvc cache dir /big/disk")
    return Check("disk", True, detail)


# --- writable directories --------------------------------------------------------------------------------


def check_dvc_dirs(root: Path) -> list[Check]:
    site = Path(os.environ.get("DVC_SITE_CACHE_DIR", DVC_SITE_CACHE_DEFAULT))
    return [
        writable_check("dvc cache", dvc_cache_dir(root), "dvc cache dir <writable dir>, or mount the repo writable"),
        writable_check("dvc site cache", site, "export DVC_SITE_CACHE_DIR=<writable dir>"),
    ]


def dvc_cache_dir(root: Path) -> Path:
    """`cache.dir` from .dvc/config.local or .dvc/config (relative to .dvc/), else .dvc/cache."""
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser()
        try:
            parser.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if parser.has_option("cache", "dir"):
            return (root / ".dvc" / parser.get("cache", "dir")).resolve()
    return root / ".dvc" / "cache"


def check_dataset_roots(params: Mapping[str, Any], root: Path) -> list[Check]:
    """`data.out` must be writable (the prepare stage writes it); `pretrain.data.root` must exist, unless it
    lies inside `data.out`, which prepare makes."""
    checks = []
    out = lookup(params, "data.out")
    if out is not None:
        checks.append(writable_check("data.out", root / str(out), "mount a writable volume there, or fix data.out"))
    data_root = lookup(params, "pretrain.data.root")
    if data_root is not None:
        checks.append(readable_root_check(root / str(data_root), None if out is None else root / str(out)))
    return checks


def readable_root_check(path: Path, made_under: Path | None) -> Check:
    name = "pretrain.data.root"
    made_by_prepare = made_under is not None and path.resolve().is_relative_to(made_under.resolve())
    if made_by_prepare and not path.exists():
        return Check(name, True, f"{path} is made by the prepare stage (inside data.out)")
    if not path.is_dir():
        return Check(name, False, f"{path} is not a directory",
                     "mount the dataset (docker run -v DATA:/data) and set pretrain.data.root to it")
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(name, False, f"{path} is not readable by uid {os.getuid()}", "fix its permissions")
    return Check(name, True, f"{path} readable")


def writable_check(name: str, path: Path, fix: str) -> Check:
    """`path` is writable, or can be made: its nearest existing ancestor is a writable directory."""
    target = nearest_existing(path)
    if not target.is_dir():
        return Check(name, False, f"{path}: {target} is not a directory", fix)
    if not os.access(target, os.W_OK | os.X_OK) or not _can_create_in(target):
        return Check(name, False, f"{path}: {target} is not writable by uid {os.getuid()}", fix)
    return Check(name, True, f"{path} writable" + ("" if target == path else f" (made in {target})"))


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_create_in(folder: Path) -> bool:
    # os.access trusts the mode bits; a read-only bind mount or a full disk shows only when writing.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
            return True
    except OSError:
        return False
