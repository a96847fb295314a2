"""The `ablation` section: the paper's sweeps (Fig. 5: number of proxies; Fig. 6: mask ratio) and a third
axis beyond the paper (a separate IMG mask ratio, §6 future work), run as DAG stages.

Each axis lists the points to train besides the main run: the point equal to the main run (the base
variant's own K or mask ratio) is read from `runs/pretrain/<base>` and its evaluations instead of being
trained twice, so an axis must not list it. Every point pretrains the base variant with the profile's
recipe and one value changed (`semanticmim pretrain BASE --set AXIS=VALUE`), into
`runs/ablation/<axis>/<value>/pretrain`, and is evaluated by `ablation.protocols` into
`runs/ablation/<axis>/<value>/<protocol>`; the report draws one figure per axis with the baseline variant
as a horizontal reference and the paper's optimum marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, PositiveInt

from semanticmim.errors import InputError
from semanticmim.settings import Strict
from stages.params import load_section

Axis = Literal["num_proxy", "mask_ratio", "img_mask_ratio"]
AXES: tuple[Axis, ...] = ("num_proxy", "mask_ratio", "img_mask_ratio")
PAPER_OPTIMUM = {"num_proxy": 8, "mask_ratio": 0.6}  # [paper §4.4, §4.5: Figs. 5 and 6]
Ratio = float  # validated by the recipe (0 < r < 1)
SweepProtocol = Literal["linear_cls", "finetune_cls"]


class Recipes(Protocol):
    """What the points are checked against: the `pretrain` section (stages.pretrain.PretrainParams; not
    imported here, so that the report, which reads this schema, does not depend on the training code)."""

    def resolve(self, variant: str, overrides: dict[str, Any] | None = None, where: str = "--set") -> Any: ...


class AblationParams(Strict):
    """`ablation` in params.yaml. Axis lists hold the points besides the main run (see the module docstring)."""

    # variant names, checked by `check_points` (the registry is not imported: see `Recipes`)
    base: str = "beit-semanticmim"  # the variant swept [paper: BEiT+SemanticMIM]
    baseline: str = "beit"  # drawn as a horizontal reference
    protocols: tuple[SweepProtocol, ...] = ("linear_cls", "finetune_cls")  # [paper: fine-tune top-1]
    num_proxy: tuple[PositiveInt, ...] = ()  # paper: 1, 2, 4, 8, 16, 32 (at r = 0.6)
    mask_ratio: tuple[Ratio, ...] = ()  # paper: 0.4 ... 0.8 (at K = 8)
    img_mask_ratio: tuple[Ratio, ...] = ()  # beyond the paper: the IMG stream's own ratio, MASK's kept
    note: str = Field("", max_length=300)  # stated on every figure (the sweep's schedule, say)

    def points(self, axis: Axis) -> tuple[float | int, ...]:
        return getattr(self, axis)

    def check_points(self, pretrain: Recipes) -> None:
        """Every point resolves to a valid recipe, no axis lists the main run's own value, the
        base and the baseline are evaluated by the same protocols as the sweep (the report reads them)."""
        pretrain.resolve(self.baseline, where="ablation.baseline")
        main = pretrain.resolve(self.base)
        for axis in AXES:
            values = self.points(axis)
            if len(set(values)) != len(values):
                raise InputError(f"ablation.{axis}: {list(values)} lists a point twice")
            if axis != "img_mask_ratio" and getattr(main, axis) in values:
                raise InputError(f"ablation.{axis}: {getattr(main, axis)} is the main run's value "
                                 f"(pretrain.variants.{self.base}.{axis}); it is read from runs/pretrain/"
                                 f"{self.base}, list only the other points")
            for value in values:
                pretrain.resolve(self.base, {axis: value}, where=f"ablation.{axis} (point {value})")
        if main.mask_ratio is None:
            raise InputError(f"ablation.base: {self.base} masks no patches; sweep a masked-image-modeling variant")


def load(params_file: Path) -> AblationParams:
    """The `ablation` section, its points checked against the `pretrain` section (one-line InputErrors)."""
    ablation = load_section(params_file, "ablation")
    try:
        ablation.check_points(load_section(params_file, "pretrain"))
    except InputError as error:
        raise InputError(f"{params_file}: {error}") from None
    return ablation


def point_dir(root: Path, axis: str, value: float | int) -> Path:
    """`runs/ablation/<axis>/<value>`: the folder of one point (`value` as dvc.yaml writes `${item}`)."""
    return root / "runs" / "ablation" / axis / str(value)

