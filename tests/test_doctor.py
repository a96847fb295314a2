"""`semanticmim doctor`: each check passes on a sound setup and fails, with a fix, on a broken one."""

import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages import doctor
from stages.doctor import Check

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _fake_statvfs(total_bytes: int):
    """os.statvfs with a /dev/shm of `total_bytes`; other paths (shutil.disk_usage's) stay real."""
    real = os.statvfs

    def statvfs(path: os.PathLike) -> object:
        if Path(path) != Path("/dev/shm"):
            return real(path)
        blocks = total_bytes // 4096
        return SimpleNamespace(f_frsize=4096, f_blocks=blocks, f_bavail=blocks, f_bfree=blocks)

    return statvfs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- packages


def test_packages_match_the_repo_lock() -> None:
    check = doctor.check_packages(ROOT / "requirements.lock")
    assert check.ok, check.detail


def test_packages_fail_on_a_wrong_version_in_the_lock(tmp_path: Path) -> None:
    real = doctor.installed_versions()
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"PyYAML==0.0.1\ntorch=={real['torch']}\nnot-installed-anywhere==1.0\n")
    check = doctor.check_packages(lock)
    assert not check.ok
    assert check.detail == f"1 differ from requirements.lock: pyyaml {real['pyyaml']} (locked 0.0.1)"
    assert "pip install -c requirements.lock" in check.fix


def test_packages_accept_a_local_label_of_the_locked_release(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "installed_versions", lambda: {"torch": "2.14.1+cpu", "numpy": "2.4.6"})
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.14.1\nnumpy==2.4.6\n")
    assert doctor.check_packages(lock).ok
    lock.write_text("torch==2.14.2\nnumpy==2.4.6\n")
    assert not doctor.check_packages(lock).ok


def test_packages_fail_in_one_line_without_a_lock(tmp_path: Path) -> None:
    check = doctor.check_packages(tmp_path / "requirements.lock")
    assert not check.ok and "cannot read lock" in check.detail and "\n" not in check.detail


# --- CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cuda_checks_are_skipped_on_a_cpu_host(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "NVIDIA_CTL", tmp_path / "nvidiactl")
    checks = doctor.check_cuda()
    assert [c.name for c in checks] == ["cuda", "cudnn", "nccl"]
    assert all(c.ok and "skipped" in c.detail for c in checks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cuda_fails_when_devices_exist_but_torch_sees_none(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(doctor, "NVIDIA_CTL", tmp_path / "nvidiactl")
    (check,) = doctor.check_cuda()
    assert not check.ok and "torch sees no GPU" in check.detail and check.fix


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cudnn_nccl_report_versions_on_a_gpu() -> None:
    checks = {c.name: c for c in doctor.check_cuda()}
    assert all(c.ok for c in checks.values()), checks
    assert checks["cudnn"].detail.startswith("cuDNN ") and checks["nccl"].detail.startswith("NCCL ")


# --- all-reduce


def test_all_reduce_is_skipped_in_one_process() -> None:
    check = doctor.check_all_reduce({"PATH": os.environ["PATH"]})
    assert check.ok and "skipped" in check.detail


def test_all_reduce_rejects_a_bad_world_size() -> None:
    check = doctor.check_all_reduce({"WORLD_SIZE": "two"})
    assert not check.ok and "WORLD_SIZE='two'" in check.detail


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {**os.environ, "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_all_reduce_over_two_ranks() -> None:
    port, results = _free_port(), {}

    def rank(r: int) -> None:
        results[r] = doctor.check_all_reduce(_rank_env(r, 2, port), timeout_s=30)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.ok for c in results.values()), results
    assert "gloo, 2 ranks" in results[0].detail


def test_all_reduce_with_a_missing_rank_fails_within_seconds() -> None:
    start = time.monotonic()
    check = doctor.check_all_reduce(_rank_env(0, 2, _free_port()), timeout_s=3)
    assert not check.ok and "2 ranks" in check.detail and "--rdzv_endpoint" in check.fix
    assert time.monotonic() - start < 3 + 15


# --- shm, disk


def test_shm_fails_when_smaller_than_workers_need(monkeypatch) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(64 * 1024**2))
    check = doctor.check_shm(num_workers=4)
    assert not check.ok and "0.06 GiB" in check.detail and "--ipc=host" in check.fix


def test_shm_is_not_needed_without_workers(monkeypatch) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(64 * 1024**2))
    assert doctor.check_shm(num_workers=0).ok


def test_shm_is_enough_at_8_gib(monkeypatch) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(8 * 1024**3))
    assert doctor.check_shm(num_workers=10).ok


def test_disk_fails_when_nearly_full(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=9, free=1024**2))
    check = doctor.check_disk(tmp_path)
    assert not check.ok and check.detail.startswith("0.0 GiB free")


# --- writable directories, dataset roots


def test_writable_dir_passes(tmp_path: Path) -> None:
    assert doctor.writable_check("x", tmp_path / "not" / "yet", "fix").ok


def test_unwritable_dir_fails(monkeypatch, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    check = doctor.writable_check("dvc cache", locked / "cache", "dvc cache dir <writable dir>")
    assert not check.ok and "not writable" in check.detail and check.fix == "dvc cache dir <writable dir>"


def test_dir_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    check = doctor.writable_check("data.out", tmp_path / "file" / "smoke", "fix")
    assert not check.ok and "is not a directory" in check.detail


def test_dvc_cache_dir_from_config(tmp_path: Path) -> None:
    assert doctor.dvc_cache_dir(tmp_path) == tmp_path / ".dvc" / "cache"
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[cache]\n    dir = ../../shared-cache\n")
    assert doctor.dvc_cache_dir(tmp_path) == (tmp_path.parent / "shared-cache").resolve()


def test_dataset_root_outside_data_out_must_exist(tmp_path: Path) -> None:
    params = {"data": {"out": "data/smoke"}, "pretrain": {"data": {"root": "/nonexistent/imagenet"}}}
    out, root = doctor.check_dataset_roots(params, tmp_path)
    assert out.ok and out.name == "data.out"
    assert not root.ok and "-v DATA:/data" in root.fix


def test_dataset_root_inside_data_out_is_made_by_prepare(tmp_path: Path) -> None:
    params = {"data": {"out": "data/smoke"}, "pretrain": {"data": {"root": "data/smoke/classification"}}}
    assert all(c.ok for c in doctor.check_dataset_roots(params, tmp_path))


def test_existing_dataset_root_passes(tmp_path: Path) -> None:
    (tmp_path / "imagenet").mkdir()
    (check,) = doctor.check_dataset_roots({"pretrain": {"data": {"root": str(tmp_path / "imagenet")}}}, tmp_path)
    assert check.ok


# --- params


def test_params_read_errors_are_one_failed_check(tmp_path: Path) -> None:
    params, check = doctor.load_params(tmp_path / "absent.yaml")
    assert params == {} and not check.ok and "cannot read" in check.detail
    params, check = doctor.load_params(_params(tmp_path, "data: [unclosed\n"))
    assert not check.ok and "not valid YAML" in check.detail and "\n" not in check.detail
    params, check = doctor.load_params(_params(tmp_path, "- a list\n"))
    assert not check.ok and "not a mapping" in check.detail


def test_max_num_workers_walks_every_section() -> None:
    params = {"dvae": {"data": {"num_workers": 2}}, "eval": {"linear_cls": {"num_workers": 6}}, "x": [{}]}
    assert doctor.max_num_workers(params) == 6
    assert doctor.max_num_workers({}) == 0


# --- the whole report


@pytest.fixture
def roomy_disk(monkeypatch) -> None:
    """A disk with 100 GiB free, so the whole-report tests do not depend on the machine's free space."""
    free = 100 * 1024**3
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(total=2 * free, used=free, free=free))


def test_run_checks_on_the_smoke_profile_pass(roomy_disk, tmp_path: Path) -> None:
    checks = doctor.run_checks(SMOKE, ROOT / "requirements.lock", root=tmp_path)
    assert doctor.exit_code(checks) == 0, doctor.format_report(checks)
    names = [c.name for c in checks]
    for name in ("packages", "cuda", "all-reduce", "shm", "disk", "dvc cache", "data.out", "pretrain.data.root"):
        assert name in names


def test_run_checks_fails_on_a_tiny_shm_with_workers(roomy_disk, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(64 * 1024**2))
    params = _params(tmp_path, "data: {out: data/x}\npretrain: {data: {root: data/x/cls, num_workers: 8}}\n")
    checks = doctor.run_checks(params, ROOT / "requirements.lock", root=tmp_path)
    assert doctor.exit_code(checks) == 1
    assert [c.name for c in checks if not c.ok] == ["shm"]
    report = doctor.format_report(checks)
    assert "FAIL  shm" in report and "--ipc=host" in report and report.endswith("1 failed")


def test_format_report_one_line_per_check_with_the_fix() -> None:
    report = doctor.format_report([Check("a", True, "fine"), Check("bb", False, "broken", "do this")])
    assert report.splitlines() == ["ok    a   fine", "FAIL  bb  broken  -> fix: do this", "2 checks, 1 failed"]
    assert doctor.exit_code([Check("a", True, "fine")]) == 0
