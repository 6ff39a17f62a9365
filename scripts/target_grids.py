"""The cost of each deployment target's grid, from run records: one row per (width, recipe).

    python scripts/target_grids.py RUNS [RUNS ...] --out results/targets/avx2_grid [--readme README.md]

Reads every ``record.json`` under the given directories (``qat.analysis.records.load_records``) and writes
``<out>.csv`` and ``<out>.md``: per model width and recipe (the target, its ``avx2_grid`` and the bits that ran,
read back from the model), the float, simulated and integer top-1, the lowest top-1 agreement of any engine
with the simulated model (strict, and counting ties at the top as agreement), the share of 16-bit pair sums
that overflow (the saturation diagnostic) and the host's CPU flags. With ``--readme`` the table replaces the
block between ``<!-- AVX2_GRID_TABLE -->`` and ``<!-- /AVX2_GRID_TABLE -->`` (README tables are regenerated,
never typed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from qat.analysis.engines import isa_overrides
from qat.analysis.readme import markdown_table, publish
from qat.analysis.records import load_records
from qat.records import atomic_write_bytes

MARKER = "AVX2_GRID_TABLE"
COLUMNS = {"width": "width", "recipe": "recipe", "bits": "bits ran", "float": "float top-1",
           "sim": "simulated top-1", "int": "int8 top-1", "engine": "primary engine",
           "agreement": "lowest engine agreement (%)", "tie_aware": "lowest, ties as agreement (%)",
           "overflow": "pair sums overflowing (%)", "host": "host flags"}


def _recipe(row: pd.Series) -> str:
    target = row.get("target.name")
    if pd.isna(target):
        return "no target (older record)"
    grid = row.get("target.avx2_grid")
    return f"{target} ({grid})" if isinstance(grid, str) else str(target)


def _bits(value: object) -> str:
    """``7`` for 7 or 7.0; ``mixed`` where layers differ (the record's ``{"mixed": ...}`` flattened away)."""
    return str(int(value)) if isinstance(value, (int, float)) and not pd.isna(value) else "mixed"


def grid_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per int8 run: width, recipe, bits, float/sim/int top-1, lowest agreement, overflow share, host."""
    runs = frame[frame["quant.precision"] == "int8"]
    rows = []
    for _, r in runs.iterrows():
        flags = r.get("target.host_flags")
        rows.append({
            "width": r.get("model.width_mult"), "recipe": _recipe(r),
            "bits": f"w{_bits(r.get('quant.weight_bits'))}a{_bits(r.get('quant.act_bits'))}",
            "float": r.get("accuracy.float_top1"), "sim": r.get("accuracy.sim_top1"),
            "int": r.get("accuracy.int_top1"), "engine": r.get("fidelity.primary_engine"),
            "agreement": r.get("fidelity.min_agreement_with_sim"),
            "tie_aware": r.get("fidelity.min_agreement_with_sim_tie_aware", float("nan")),
            "overflow": 100 * r["saturation.overflow_share"] if pd.notna(r.get("saturation.overflow_share"))
            else float("nan"),
            "host": (" ".join(flags) if isinstance(flags, list) else "") + isa_overrides(r),
        })
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["width", "recipe"], kind="stable").reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """The table with the README's column names (width as given, overflow share to 4 decimals)."""
    return markdown_table(table.rename(columns=COLUMNS), {COLUMNS["width"]: "{:g}", COLUMNS["overflow"]: "{:.4f}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.csv and .md)")
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args(argv)
    frames = []
    for root in args.runs:
        if not root.is_dir():
            print(f"error: {root} is not a directory of runs (pass the sweep directories)", file=sys.stderr)
            return 2
        frames.append(load_records(root)[0])
    table = grid_table(pd.concat(frames, ignore_index=True))
    if table.empty:
        print(f"error: no int8 record under {', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    text = markdown(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out.with_suffix(".csv"), table.to_csv(index=False).encode())
    return publish({MARKER: (args.out.with_suffix(".md"), text)}, args.readme)


if __name__ == "__main__":
    raise SystemExit(main())
