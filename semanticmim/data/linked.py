"""An ImageFolder made of links into another one: a seeded, class-balanced subset of each split.

This is how a profile runs on a real ImageFolder (CIFAR-10 for the `mini` profile) with the paths the
embedded dataset uses: `OUT/train/<class>/<file>` and `OUT/val/<class>/<file>` become symbolic links to
the source's images, so nothing is copied and every stage reads the same layout whichever data it is.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from semanticmim.data.layouts import read_imagefolder
from semanticmim.errors import InputError

__all__ = ["balanced_subset", "link_imagefolder"]


def balanced_subset(samples: list[tuple[str, int]], count: int, seed: int) -> list[tuple[str, int]]:
    """`count` samples drawn class by class in turn (each class shuffled by `seed`), in a stable order:
    classes differ in size by at most one image when the source allows it."""
    if count < 1:
        raise InputError(f"count={count}: expected at least one image")
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for sample in sorted(samples):
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    chosen: list[tuple[str, int]] = []
    queues = [by_class[label] for label in sorted(by_class)]
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return sorted(chosen)


def link_imagefolder(source: Path, out: Path, splits: dict[str, tuple[str, int]], seed: int) -> dict[str, int]:
    """Link a subset of each split of the ImageFolder `source` into `out`.

    splits: {name in `out`: (split name in `source`, image count)}, e.g. {"train": ("train", 10000),
    "val": ("test", 2000)}; a count above the split's size takes it whole. -> {name: images linked}."""
    source = Path(source).resolve()
    classes = None
    linked = {}
    for name, (source_split, count) in splits.items():
        split = read_imagefolder(source, source_split, classes)
        classes = split.classes
        target = Path(out) / name
        if target.exists() and any(target.iterdir()):
            raise InputError(f"{target}: exists and is not empty; remove it to link another subset")
        for path, label in balanced_subset(split.samples, min(count, len(split.samples)), seed):
            link = target / classes[label] / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())
        linked[name] = min(count, len(split.samples))
    return linked
