"""The locked environment: `requirements.lock` (pip constraints, written by scripts/lock.sh), its hash for run
records, and its pins for `semanticmim doctor`."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

LOCK_NAME = "requirements.lock"
# Extras whose packages the lock must hold: the lock is made from `pip install -e ".[dev]"`.
LOCKED_EXTRAS = ("dev",)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


class LockError(ValueError):
    """The lock file is missing or has a line that is not NAME==VERSION."""


def canonical_name(name: str) -> str:
    """PEP 503 normalised name: `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_sha256(repo_root: Path) -> str | None:
    """sha256 of `repo_root/requirements.lock` for run records; None when the checkout has no lock."""
    path = Path(repo_root) / LOCK_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def locked_versions(path: Path) -> dict[str, str]:
    """{canonical name: version} of every `NAME==VERSION` line; comments and blank lines are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LockError(f"cannot read lock {path}: {err.strerror or err}") from err
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise LockError(f"{path}:{number}: expected NAME==VERSION, got {raw.strip()!r}")
        pins[canonical_name(match[1])] = match[2]
    return pins


def project_requirements(pyproject: Path) -> list[Requirement]:
    """`[project].dependencies` plus the LOCKED_EXTRAS of pyproject.toml, as packaging requirements."""
    try:
        project = tomllib.loads(Path(pyproject).read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise LockError(f"cannot read {pyproject}: {err}") from err
    lines = list(project.get("dependencies", []))
    for extra in LOCKED_EXTRAS:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    try:
        return [Requirement(line) for line in lines]
    except InvalidRequirement as err:
        raise LockError(f"{pyproject}: {err}") from err


def lock_problems(pyproject: Path, lock: Path) -> list[str]:
    """One line per disagreement between pyproject.toml and the lock: a requirement the lock lacks, or pins
    outside the requirement's specifier (an `==` pin in pyproject, torch's included, must be pinned exactly)."""
    pins = locked_versions(lock)
    problems = []
    for req in project_requirements(pyproject):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonical_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: required by pyproject.toml ({req}) but not in {Path(lock).name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: {Path(lock).name} pins {pins[name]}, pyproject.toml wants {req.specifier}")
    return problems
