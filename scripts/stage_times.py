"""Stage-by-stage wall time of the last `dvc repro`, from when each stage's outputs were written.

DVC runs the stages one after another, so a stage took from the moment the previous stage finished to the
moment its own last output appeared (process start-up included). Usage, in the project after a repro:

    python scripts/stage_times.py [--start EPOCH_SECONDS]    # --start: when the repro began (first stage)

Prints a Markdown table (stage, seconds) sorted in running order, and per-group totals.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml


def finished_at(stage: dict, root: Path) -> float | None:
    """The newest modification time among a stage's outputs (files or folders, recursively)."""
    times = []
    for out in stage.get("outs", []):
        path = root / out["path"]
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        times += [p.stat().st_mtime for p in files]
    return max(times) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=float, default=None, help="epoch seconds the repro started")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    lock = yaml.safe_load((args.root / "dvc.lock").read_text())["stages"]
    done = sorted((t, name) for name, stage in lock.items() if (t := finished_at(stage, args.root)) is not None)
    previous = args.start if args.start is not None else done[0][0]
    groups: dict[str, float] = {}
    print("| stage | seconds |\n|---|---|")
    for time, name in done:
        seconds = time - previous
        previous = time
        print(f"| {name} | {seconds:.0f} |")
        group = re.sub(r"@.*", "", name)
        groups[group] = groups.get(group, 0.0) + seconds
    print("\n| group | seconds | minutes |\n|---|---|---|")
    for group, seconds in groups.items():
        print(f"| {group} | {seconds:.0f} | {seconds / 60:.1f} |")
    print(f"\ntotal: {sum(groups.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
