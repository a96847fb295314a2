"""requirements.lock against pyproject.toml and against what is installed; the lock helpers on fake files."""

import os
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from stages.environment import (
    LockError,
    canonical_name,
    lock_problems,
    lock_sha256,
    locked_versions,
    project_requirements,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT, LOCK = ROOT / "pyproject.toml", ROOT / "requirements.lock"
# Not pinned by the lock: the project itself and a build tool a venv may be seeded with.
UNLOCKED = {"semanticmim", "wheel"}

FAKE_PYPROJECT = """
[project]
name = "x"
dependencies = ["torch==2.14.1", "PyYAML>=6", "dvc>=3.50", "colorama; sys_platform == 'nonexistent'"]
[project.optional-dependencies]
dev = ["pytest>=8"]
other = ["never-locked>=1"]
"""


def _write(tmp_path: Path, lock: str, pyproject: str = FAKE_PYPROJECT) -> tuple[Path, Path]:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    (tmp_path / "requirements.lock").write_text(lock)
    return tmp_path / "pyproject.toml", tmp_path / "requirements.lock"


def test_repo_lock_satisfies_pyproject() -> None:
    assert lock_problems(PYPROJECT, LOCK) == []


def test_repo_lock_pins_torch_exactly_as_pyproject() -> None:
    pins = locked_versions(LOCK)
    wanted = {canonical_name(r.name): r for r in project_requirements(PYPROJECT)}
    for name in ("torch", "torchvision"):
        (spec,) = wanted[name].specifier
        assert spec.operator == "==", f"pyproject.toml must pin {name} with =="
        assert pins[name] == spec.version


def test_installed_versions_are_the_locked_ones() -> None:
    pins = locked_versions(LOCK)
    wrong = {}
    for dist in metadata.distributions():
        name = canonical_name(dist.metadata["Name"])
        if name in pins and not Requirement(f"{name}=={pins[name]}").specifier.contains(dist.version):
            wrong[name] = f"installed {dist.version}, locked {pins[name]}"
    assert wrong == {}, "reinstall with: pip install -c requirements.lock -e '.[dev]'"


@pytest.mark.skipif(os.environ.get("SEMANTICMIM_IMAGE") is None, reason="only in the Docker image")
def test_image_installs_nothing_beyond_the_lock() -> None:
    pins = locked_versions(LOCK)
    installed = sorted(canonical_name(d.metadata["Name"]) for d in metadata.distributions())
    assert [name for name in installed if name not in pins and name not in UNLOCKED] == []


def test_lock_problems_accepts_a_consistent_lock(tmp_path: Path) -> None:
    # colorama's marker is false here, and `other` is not a locked extra: neither is required.
    pyproject, lock = _write(tmp_path, "# header\ntorch==2.14.1\npyyaml==6.0.4\ndvc==3.67.1\npytest==9.2.0\n")
    assert lock_problems(pyproject, lock) == []


def test_lock_problems_names_a_missing_dependency(tmp_path: Path) -> None:
    pyproject, lock = _write(tmp_path, "torch==2.14.1\npyyaml==6.0.4\npytest==9.2.0\n")
    assert lock_problems(pyproject, lock) == [
        "dvc: required by pyproject.toml (dvc>=3.50) but not in requirements.lock"
    ]


def test_lock_problems_names_a_dev_dependency_missing(tmp_path: Path) -> None:
    pyproject, lock = _write(tmp_path, "torch==2.14.1\npyyaml==6.0.4\ndvc==3.67.1\n")
    assert [p.split(":")[0] for p in lock_problems(pyproject, lock)] == ["pytest"]


def test_lock_problems_names_a_pin_outside_the_specifier(tmp_path: Path) -> None:
    pyproject, lock = _write(tmp_path, "torch==2.14.1\nPyYAML==5.4\ndvc==3.67.1\npytest==9.2.0\n")
    assert lock_problems(pyproject, lock) == ["PyYAML: requirements.lock pins 5.4, pyproject.toml wants >=6"]


def test_lock_problems_names_a_different_torch(tmp_path: Path) -> None:
    pyproject, lock = _write(tmp_path, "torch==2.13.0\npyyaml==6.0.4\ndvc==3.67.1\npytest==9.2.0\n")
    assert lock_problems(pyproject, lock) == ["torch: requirements.lock pins 2.13.0, pyproject.toml wants ==2.14.1"]


def test_locked_versions_normalises_names_and_skips_comments(tmp_path: Path) -> None:
    _, lock = _write(tmp_path, "# made by lock.sh\n\nPyYAML==6.0.4  # inline\nzc.lockfile==4.0\nDALL-E==0.1\n")
    assert locked_versions(lock) == {"pyyaml": "6.0.4", "zc-lockfile": "4.0", "dall-e": "0.1"}


@pytest.mark.parametrize("line", ["torch>=2", "-e .", "torch @ file:///wheels/torch.whl", "torch"])
def test_locked_versions_rejects_a_line_that_is_not_a_pin(tmp_path: Path, line: str) -> None:
    _, lock = _write(tmp_path, f"numpy==2.4.6\n{line}\n")
    with pytest.raises(LockError, match=r"requirements.lock:2: expected NAME==VERSION"):
        locked_versions(lock)


def test_locked_versions_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="cannot read lock") as err:
        locked_versions(tmp_path / "absent.lock")
    assert "\n" not in str(err.value)


def test_lock_sha256_changes_with_the_lock_and_is_none_without_one(tmp_path: Path) -> None:
    assert lock_sha256(tmp_path) is None
    (tmp_path / "requirements.lock").write_text("numpy==2.4.6\n")
    first = lock_sha256(tmp_path)
    (tmp_path / "requirements.lock").write_text("numpy==2.4.7\n")
    assert first is not None and len(first) == 64
    assert lock_sha256(tmp_path) != first
    assert lock_sha256(ROOT) is not None
