"""The paper's Table 1, rebuilt from our runs: our value (± std over seeds) beside the paper's, each
SemanticMIM row's delta over its baseline marked as reproducing the paper's direction or not, floor rows,
and a link from every number to the run that produced it. Written as `table1.md`, `table1.csv`, `table1.tex`.

Values are percentages (top-1 accuracy, mIoU), like the paper's. Marks:
* direction: ✓ when our delta has the paper's sign (all the paper's deltas are positive), ✗ otherwise;
  "within spread" when both spreads are known and |delta| <= sqrt(s_row² + s_baseline²).
* at paper scale only, ⚠ on a cell more than 1 pt from the paper's value.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from semanticmim.errors import InputError

COLUMNS = ("linear_cls", "linear_patch", "finetune_cls", "finetune_patch", "voc_linear_miou", "ade_finetune_miou")
COLUMN_TITLES = {
    "linear_cls": "Linear CLS", "linear_patch": "Linear Patch", "finetune_cls": "FT CLS", "finetune_patch": "FT Patch",
    "voc_linear_miou": "VOC linear mIoU", "ade_finetune_miou": "ADE20K FT mIoU",
}
CLASSIFICATION_COLUMNS = COLUMNS[:4]
ROWS = ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3", "random-init", "raw-pixels")
ROW_TITLES = {
    "beit": "BEiT", "beit-semanticmim": "BEiT + SemanticMIM", "maskfeat": "MaskFeat",
    "maskfeat-semanticmim": "MaskFeat + SemanticMIM", "mocov3": "MoCo v3 (reference)",
    "random-init": "Random init (floor)", "raw-pixels": "Raw pixels (floor)",
}
BASELINES = {"beit-semanticmim": "beit", "maskfeat-semanticmim": "maskfeat"}
PAPER: dict[str, tuple[float, ...]] = {  # paper Table 1, in COLUMNS order
    "beit": (31.5, 38.7, 81.9, 82.2, 23.8, 40.2),
    "beit-semanticmim": (49.2, 48.2, 83.0, 82.9, 43.1, 44.1),
    "maskfeat": (23.4, 33.5, 82.7, 83.0, 37.8, 42.6),
    "maskfeat-semanticmim": (52.0, 59.7, 83.7, 83.6, 49.5, 45.7),
}
PAPER_TOLERANCE = 1.0  # points
NOT_APPLICABLE = {("raw-pixels", c): "n/a: raw pixels are a floor for the classification columns only"
                  for c in COLUMNS if c not in CLASSIFICATION_COLUMNS}
NO_RESULT = "no result recorded"
PATH_KEYS = ("metrics", "run", "config")
SOURCE_KEYS = (*PATH_KEYS, "commit", "encoder_sha256", "tokenizer", "tokenizer_sha256", "preset")
CSV_COLUMNS = ("row", "column", "status", "value", "spread", "seeds", "paper", "off_paper", "baseline", "delta",
               "delta_spread", "paper_delta", "direction_ok", "beyond_spread", "note", *SOURCE_KEYS)


@dataclass(frozen=True)
class Cell:
    """One number of Table 1. value/spread in percent; spread = std over `seeds` runs (None for one seed).
    note: why value is None (e.g. "not run at this profile: ..."). source: any of SOURCE_KEYS: paths of the
    metrics file, run.json and resolved config; commit; encoder sha256; tokenizer kind and sha256 (BEiT
    rows); preset (e.g. the fine-tune recipe "paper" / "authors")."""

    row: str
    column: str
    value: float | None
    spread: float | None = None
    seeds: int = 1
    note: str = ""
    source: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- the frame


def _check(cells: list[Cell]) -> dict[tuple[str, str], Cell]:
    by_key: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        key = (cell.row, cell.column)
        if cell.row not in ROWS or cell.column not in COLUMNS:
            raise InputError(f"table1 cell {key}: row must be one of {list(ROWS)}, column one of {list(COLUMNS)}")
        if key in by_key:
            raise InputError(f"table1 cell {key} is given twice")
        unknown = sorted(set(cell.source) - set(SOURCE_KEYS))
        if unknown:
            raise InputError(f"table1 cell {key}: unknown source keys {unknown}; expected some of {list(SOURCE_KEYS)}")
        if key in NOT_APPLICABLE and cell.value is not None:
            raise InputError(f"table1 cell {key} has a value but is not applicable ({NOT_APPLICABLE[key]})")
        if cell.value is not None and not math.isfinite(cell.value):
            raise InputError(f"table1 cell {key}: value {cell.value} is not a finite number")
        by_key[key] = cell
    return by_key


def _paper(row: str, column: str) -> float | None:
    return PAPER[row][COLUMNS.index(column)] if row in PAPER else None


def _record(row: str, column: str, cell: Cell | None, paper_scale: bool) -> dict:
    key = (row, column)
    value = None if cell is None else cell.value
    if key in NOT_APPLICABLE:
        status, note = "n/a", NOT_APPLICABLE[key]
    elif value is None:
        status, note = "missing", (cell.note if cell is not None and cell.note else NO_RESULT)
    else:
        status, note = "ok", "" if cell is None else cell.note
    paper = _paper(row, column)
    off = abs(value - paper) > PAPER_TOLERANCE if paper_scale and value is not None and paper is not None else None
    source = {} if cell is None else cell.source
    return {"row": row, "column": column, "status": status, "value": value,
            "spread": None if cell is None else cell.spread, "seeds": 0 if cell is None else cell.seeds,
            "paper": paper, "off_paper": off, "note": note, **{k: source.get(k) for k in SOURCE_KEYS}}


def _delta(record: dict, base: dict) -> dict:
    """Delta columns of a SemanticMIM record against its baseline's record."""
    paper_delta = None
    if record["paper"] is not None and base["paper"] is not None:
        paper_delta = round(record["paper"] - base["paper"], 4)
    out = {"baseline": base["row"], "delta": None, "delta_spread": None, "paper_delta": paper_delta,
           "direction_ok": None, "beyond_spread": None}
    if record["value"] is None or base["value"] is None:
        return out
    delta = round(record["value"] - base["value"], 4)
    expected_sign = 1.0 if paper_delta is None else math.copysign(1.0, paper_delta)
    out.update(delta=delta, direction_ok=delta * expected_sign > 0)
    if record["spread"] is not None and base["spread"] is not None:
        spread = math.hypot(record["spread"], base["spread"])
        out.update(delta_spread=spread, beyond_spread=abs(delta) > spread)
    return out


def table1_frame(cells: list[Cell], paper_scale: bool = False) -> pd.DataFrame:
    """Every (row, column) of Table 1, in ROWS x COLUMNS order, with CSV_COLUMNS: our value and spread, the
    paper's, the ±1 pt flag (`off_paper`, only at paper_scale), the delta over the baseline with its combined
    spread and direction marks (SemanticMIM rows only), the note of an empty cell and the source fields."""
    by_key = _check(cells)
    records = {(r, c): _record(r, c, by_key.get((r, c)), paper_scale) for r in ROWS for c in COLUMNS}
    blank = {"baseline": None, "delta": None, "delta_spread": None, "paper_delta": None, "direction_ok": None,
             "beyond_spread": None}
    for (row, column), record in records.items():
        record.update(_delta(record, records[(BASELINES[row], column)]) if row in BASELINES else blank)
    return pd.DataFrame([records[(r, c)] for r in ROWS for c in COLUMNS], columns=list(CSV_COLUMNS))


# ----------------------------------------------------------------------------------- formatting


def _num(x: float) -> str:
    return f"{x:.1f}"


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def _present(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _is(x, flag: bool) -> bool:
    """x is the boolean `flag` (pandas hands back numpy bools, NaN or None)."""
    return _present(x) and bool(x) is flag


def _direction_mark(r: pd.Series) -> str:
    mark = "✓" if _is(r["direction_ok"], True) else "✗"
    return mark + (" (within spread)" if _is(r["beyond_spread"], False) else "")


def _link(path: str, out_dir: Path, link_base: Path) -> str:
    target = Path(path) if Path(path).is_absolute() else Path(link_base) / path
    rel = Path(os.path.relpath(target.resolve(), Path(out_dir).resolve())).as_posix()
    return f"<{rel}>" if " " in rel else rel


def _source_note(r: pd.Series, out_dir: Path, link_base: Path) -> str:
    parts = [f"[{key}]({_link(r[key], out_dir, link_base)})" for key in PATH_KEYS if _present(r[key])]
    if _present(r["commit"]):
        parts.append(f"commit `{str(r['commit'])[:12]}`")
    if _present(r["encoder_sha256"]):
        parts.append(f"encoder sha256 `{str(r['encoder_sha256'])[:12]}…`")
    if _present(r["tokenizer"]):
        sha = f" (sha256 `{str(r['tokenizer_sha256'])[:12]}…`)" if _present(r["tokenizer_sha256"]) else ""
        parts.append(f"tokenizer {r['tokenizer']}{sha}")
    if _present(r["preset"]):
        parts.append(f"preset {r['preset']}")
    seeds = f" ({int(r['seeds'])} seeds)" if r["seeds"] > 1 else ""
    where = " · ".join(parts) if parts else "**source not recorded**"
    return f"{ROW_TITLES[r['row']]} · {COLUMN_TITLES[r['column']]}{seeds}: {where}"


def _md_cell(r: pd.Series, footnote: int | None) -> str:
    if r["status"] != "ok":
        lines = [f"— *{r['note']}*"]
    else:
        spread = f" ± {_num(r['spread'])}" if _present(r["spread"]) else ""
        flag = " ⚠" if _is(r["off_paper"], True) else ""
        lines = [f"**{_num(r['value'])}**{spread}{flag} [^{footnote}]"]
        if _present(r["delta"]):
            lines.append(f"Δ {_signed(r['delta'])} {_direction_mark(r)}")
        elif r["row"] in BASELINES:
            lines.append(f"Δ — ({ROW_TITLES[BASELINES[r['row']]]} has no value)")
    if _present(r["paper"]):
        paper_delta = f" (Δ {_signed(r['paper_delta'])})" if _present(r["paper_delta"]) else ""
        lines.append(f"paper {_num(r['paper'])}{paper_delta}")
    return "<br>".join(lines)


def _header_lines(header: dict) -> list[str]:
    missing = [k for k in ("profile", "datasets") if k not in header]
    if missing:
        raise InputError(f"table1 header: missing {missing}; it must say which profile and datasets made the numbers")
    lines = []
    for key, value in header.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list | tuple):
            value = "; ".join(map(str, value))
        lines.append(f"- **{key}**: {value}")
    return lines


def table1_markdown(frame: pd.DataFrame, header: dict, paper_scale: bool, out_dir: Path, link_base: Path) -> str:
    """The Markdown page: header, the table (our value, Δ and the paper's value per cell), legend and one
    footnote per number with relative links to its sources."""
    lines = ["# Table 1 — ours beside the paper's", "", *_header_lines(header), "",
             "| Method | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    footnotes: list[str] = []
    for row in ROWS:
        cells = []
        for _, r in frame[frame["row"] == row].iterrows():
            number = None
            if r["status"] == "ok":
                footnotes.append(_source_note(r, out_dir, link_base))
                number = len(footnotes)
            cells.append(_md_cell(r, number))
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    lines += ["", "Values in %, ± = standard deviation over seeds. Δ = SemanticMIM row minus its baseline row; "
              "✓ = same sign as the paper's Δ, ✗ = not; *within spread* = |Δ| ≤ √(s₁² + s₂²)."]
    if paper_scale:
        lines.append(f"⚠ = more than {PAPER_TOLERANCE:.0f} pt from the paper's value (paper-scale run).")
    else:
        lines.append("Not a paper-scale run: values are not expected to match the paper's, only the directions.")
    lines += ["", *(f"[^{i}]: {note}" for i, note in enumerate(footnotes, start=1))]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_cell(r: pd.Series) -> str:
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] != "ok":
        return "n/r"
    text = _num(r["value"]) + (rf"\,$\pm$\,{_num(r['spread'])}" if _present(r["spread"]) else "")
    if _present(r["delta"]):
        text += f" ({_signed(r['delta'])})" + ("" if _is(r["direction_ok"], True) else r"$^\dagger$")
    return text + (r"$^\ast$" if _is(r["off_paper"], True) else "")


def table1_latex(frame: pd.DataFrame, header: dict, paper_scale: bool) -> str:
    """A booktabs table: our rows, then the paper's rows; notes for empty cells below it."""
    n = len(COLUMNS)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{l{'c' * n}}}", r"\toprule",
             "Method & " + " & ".join(_tex(COLUMN_TITLES[c]) for c in COLUMNS) + r" \\", r"\midrule",
             rf"\multicolumn{{{n + 1}}}{{l}}{{\textit{{Ours: {_tex(header.get('profile', ''))}}}}} \\"]
    for row in ROWS:
        cells = [_tex_cell(r) for _, r in frame[frame["row"] == row].iterrows()]
        lines.append(f"{_tex(ROW_TITLES[row])} & " + " & ".join(cells) + r" \\")
    lines += [r"\midrule", rf"\multicolumn{{{n + 1}}}{{l}}{{\textit{{Paper (Table 1)}}}} \\"]
    for row, values in PAPER.items():
        base = PAPER.get(BASELINES.get(row, ""))
        cells = [_num(v) + (f" ({_signed(v - b)})" if base else "") for v, b in zip(values, base or values,
                                                                                   strict=True)]
        lines.append(f"{_tex(ROW_TITLES[row])} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\footnotesize"]
    notes = []
    if any(_is(x, False) for x in frame["direction_ok"]):
        notes.append(r"$^\dagger$ delta against the paper's direction.")
    if paper_scale:
        notes.append(rf"$^\ast$ more than {PAPER_TOLERANCE:.0f} pt from the paper's value.")
    for _, r in frame[frame["status"] == "missing"].iterrows():
        notes.append(f"n/r {_tex(ROW_TITLES[r['row']])}, {_tex(COLUMN_TITLES[r['column']])}: {_tex(r['note'])}.")
    if (frame["status"] == "n/a").any():
        notes.append(f"n/a: {_tex(next(iter(NOT_APPLICABLE.values())).removeprefix('n/a: '))}.")
    lines += [note + r"\\" for note in notes]
    lines += [rf"\caption{{Table 1 rebuilt. {_tex(header.get('datasets', ''))}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def table1_csv(frame: pd.DataFrame) -> str:
    """One line per (row, column), CSV_COLUMNS; empty fields for None."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in frame.to_dict("records"):
        writer.writerow(["" if not _present(record[c]) else record[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_table1(cells: list[Cell], out_dir: Path, header: dict, paper_scale: bool, link_base: Path) -> dict[
        str, Path]:
    """Write out_dir/table1.{md,csv,tex}. header: at least "profile" and "datasets" (what made the numbers,
    e.g. "ImageNet columns = embedded classification set at the default profile"); more keys are listed.
    link_base: the folder relative source paths are relative to (the repository root); the Markdown links
    are relative to out_dir. Returns {"md", "csv", "tex"} paths."""
    out_dir = Path(out_dir)
    frame = table1_frame(cells, paper_scale)
    texts = {"md": table1_markdown(frame, header, paper_scale, out_dir, Path(link_base)),
             "csv": table1_csv(frame), "tex": table1_latex(frame, header, paper_scale)}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"table1.{kind}" for kind in texts}
    for kind, text in texts.items():
        _write_atomic(paths[kind], text)
    return paths
