"""semanticmim.report.table1 on hand-written cells: deltas, direction marks, ±1 pt flags, notes, links, CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest

from semanticmim.errors import InputError
from semanticmim.report.table1 import COLUMNS, CSV_COLUMNS, PAPER, ROWS, Cell, table1_frame, write_table1

HEADER = {"profile": "default", "datasets": "ImageNet columns = embedded classification set at the default profile"}
SHA = "ab" * 32


def source(run: str) -> dict:
    return {"metrics": f"runs/{run}/linear/metrics.json", "run": f"runs/{run}/run.json",
            "config": f"runs/{run}/params.yaml", "commit": "0123456789abcdef0123", "encoder_sha256": SHA,
            "preset": "paper"}


def cells() -> list[Cell]:
    beit_source = {**source("beit"), "tokenizer": "dvae (ours)", "tokenizer_sha256": "cd" * 32}
    return [
        Cell("beit", "linear_cls", 31.0, 0.3, 3, source=beit_source),
        Cell("beit-semanticmim", "linear_cls", 49.0, 0.4, 3, source={**beit_source, "metrics": "runs/bs/m.json"}),
        Cell("beit", "linear_patch", 38.0, 2.0, 3, source=beit_source),
        Cell("beit-semanticmim", "linear_patch", 39.0, 2.0, 3, source=beit_source),  # +1.0 within sqrt(8) = 2.83
        Cell("maskfeat", "linear_cls", 25.0, source=source("maskfeat")),
        Cell("maskfeat-semanticmim", "linear_cls", 24.5, source=source("maskfeat-semanticmim")),  # wrong direction
        Cell("maskfeat", "voc_linear_miou", 37.0, source=source("maskfeat")),  # baseline present, ours missing
        Cell("maskfeat-semanticmim", "voc_linear_miou", None, note="not run at this profile: VOC is paper-scale only"),
        Cell("mocov3", "linear_cls", 40.0, source=source("mocov3")),
        Cell("raw-pixels", "linear_cls", 35.0, source={"metrics": "runs/raw/metrics.json"}),
    ]


def at(frame, row: str, column: str) -> dict:
    return frame[(frame["row"] == row) & (frame["column"] == column)].iloc[0].to_dict()


def test_deltas_directions_and_spreads():
    frame = table1_frame(cells())
    assert len(frame) == len(ROWS) * len(COLUMNS) and list(frame.columns) == list(CSV_COLUMNS)
    beit = at(frame, "beit-semanticmim", "linear_cls")
    assert beit["baseline"] == "beit" and beit["delta"] == pytest.approx(18.0)
    assert beit["paper_delta"] == pytest.approx(17.7) and beit["direction_ok"] and beit["beyond_spread"]
    assert beit["delta_spread"] == pytest.approx(0.5)  # sqrt(0.3² + 0.4²)
    patch = at(frame, "beit-semanticmim", "linear_patch")
    assert patch["direction_ok"] and not patch["beyond_spread"] and patch["delta_spread"] == pytest.approx(math.sqrt(8))
    wrong = at(frame, "maskfeat-semanticmim", "linear_cls")
    assert wrong["delta"] == pytest.approx(-0.5) and not wrong["direction_ok"]
    assert wrong["beyond_spread"] is None  # one seed: no spread to compare with
    missing = at(frame, "maskfeat-semanticmim", "voc_linear_miou")
    assert pd.isna(missing["delta"]) and missing["direction_ok"] is None and missing["status"] == "missing"
    assert pd.isna(at(frame, "beit", "linear_cls")["delta"])  # baselines carry no delta


def test_paper_scale_flags_cells_outside_one_point():
    assert table1_frame(cells())["off_paper"].isna().all()  # not a paper-scale run: no flags
    frame = table1_frame(cells(), paper_scale=True)
    assert at(frame, "beit", "linear_cls")["off_paper"] is False  # 31.0 vs 31.5
    assert at(frame, "beit-semanticmim", "linear_patch")["off_paper"] is True  # 39.0 vs 48.2
    assert at(frame, "maskfeat", "linear_cls")["off_paper"] is True  # 25.0 vs 23.4
    assert at(frame, "mocov3", "linear_cls")["off_paper"] is None  # no paper value
    assert at(frame, "maskfeat-semanticmim", "linear_cls")["paper"] == PAPER["maskfeat-semanticmim"][0]


def test_empty_cells_say_why():
    frame = table1_frame(cells())
    assert at(frame, "maskfeat-semanticmim", "voc_linear_miou")["note"].startswith("not run at this profile")
    assert at(frame, "random-init", "finetune_cls")["note"] == "no result recorded"
    raw = at(frame, "raw-pixels", "ade_finetune_miou")
    assert raw["status"] == "n/a" and raw["note"].startswith("n/a")
    assert at(frame, "raw-pixels", "finetune_cls")["status"] == "missing"  # a classification column: applicable


def test_written_files(tmp_path):
    out = tmp_path / "reports"
    paths = write_table1(cells(), out, HEADER, paper_scale=True, link_base=tmp_path)
    assert sorted(p.name for p in paths.values()) == ["table1.csv", "table1.md", "table1.tex"]
    md = paths["md"].read_text()
    assert "embedded classification set" in md and "**profile**: default" in md
    assert "**31.0** ± 0.3 [^1]<br>paper 31.5" in md
    assert "Δ +18.0 ✓<br>paper 49.2 (Δ +17.7)" in md
    assert "Δ +1.0 ✓ (within spread)" in md and "Δ -0.5 ✗" in md
    assert "**39.0** ± 2.0 ⚠" in md and "**31.0** ± 0.3 [^1]" in md  # flagged vs within 1 pt
    assert "— *not run at this profile: VOC is paper-scale only*" in md
    assert "— *n/a: raw pixels" in md
    table = [x for x in md.splitlines() if x.startswith("| ")][1:]
    assert len(table) == len(ROWS)
    for line in table:  # every cell of every row says something
        assert all(cell.strip() for cell in line.strip("|").split("|")), line
    assert "[metrics](../runs/beit/linear/metrics.json)" in md and "[run](../runs/beit/run.json)" in md
    assert "[metrics](../runs/bs/m.json)" in md and "commit `0123456789ab`" in md
    assert f"encoder sha256 `{SHA[:12]}…`" in md and "tokenizer dvae (ours) (sha256 `cdcdcdcdcdcd…`)" in md
    footnotes = [x for x in md.splitlines() if x.startswith("[^")]
    assert len(footnotes) == 9 and "source not recorded" not in md  # 9 numbers, each with its sources

    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(ROWS) * len(COLUMNS)
    cell = next(r for r in rows if r["row"] == "beit-semanticmim" and r["column"] == "linear_cls")
    assert (cell["value"], cell["delta"], cell["direction_ok"], cell["paper"]) == ("49.0", "18.0", "True", "49.2")
    assert cell["metrics"] == "runs/bs/m.json" and cell["tokenizer"] == "dvae (ours)" and cell["preset"] == "paper"
    empty = next(r for r in rows if r["row"] == "mocov3" and r["column"] == "ade_finetune_miou")
    assert empty["value"] == "" and empty["note"] == "no result recorded"

    tex = paths["tex"].read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\midrule") == 2
    assert r"49.0\,$\pm$\,0.4 (+18.0)" in tex and r"24.5 (-0.5)$^\dagger$" in tex
    assert r"VOC is paper-scale only" in tex and "49.2 (+17.7)" in tex
    assert not list(out.glob(".*.tmp"))


def test_links_are_relative_from_anywhere(tmp_path):
    absolute = Cell("beit", "linear_cls", 30.0, source={"metrics": str(tmp_path / "elsewhere" / "m.json")})
    paths = write_table1([absolute], tmp_path / "a" / "b", HEADER, False, link_base=Path("/ignored/for/absolute"))
    md = paths["md"].read_text()
    assert "[metrics](../../elsewhere/m.json)" in md and str(tmp_path) not in md
    assert "Not a paper-scale run" in md and "⚠" not in md


@pytest.mark.parametrize(("bad", "message"), [
    ([Cell("beit", "top5", 1.0)], "column one of"),
    ([Cell("dino", "linear_cls", 1.0)], "row must be one of"),
    ([Cell("beit", "linear_cls", 1.0), Cell("beit", "linear_cls", 2.0)], "given twice"),
    ([Cell("beit", "linear_cls", 1.0, source={"metric": "x"})], "unknown source keys"),
    ([Cell("raw-pixels", "voc_linear_miou", 10.0)], "not applicable"),
    ([Cell("beit", "linear_cls", float("nan"))], "not a finite number"),
])
def test_bad_cells_are_one_line_errors(bad, message):
    with pytest.raises(InputError, match=message) as error:
        table1_frame(bad)
    assert "\n" not in str(error.value)


def test_header_must_name_profile_and_datasets(tmp_path):
    with pytest.raises(InputError, match=r"missing \['datasets'\]"):
        write_table1(cells(), tmp_path, {"profile": "default"}, False, tmp_path)
    assert not (tmp_path / "table1.md").exists()
