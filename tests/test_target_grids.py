"""scripts/target_grids.py: the target-grid table from records, and the README block it regenerates."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grids():  # type: ignore[no-untyped-def]
    return load_script("scripts/target_grids.py")


def _row(width: float, target: str, grid: str | None, bits: int, overflow: float) -> dict[str, object]:
    return {"quant.precision": "int8", "model.width_mult": width, "target.name": target, "target.avx2_grid": grid,
            "quant.weight_bits": bits, "quant.act_bits": 8, "accuracy.float_top1": 70.0, "accuracy.sim_top1": 69.5,
            "accuracy.int_top1": 69.4, "fidelity.primary_engine": "torch_native_x86",
            "fidelity.min_agreement_with_sim": 99.0, "fidelity.min_agreement_with_sim_tie_aware": 100.0,
            "saturation.overflow_share": overflow, "target.host_flags": ["avx2", "fma"],
            "target.isa_overrides.FBGEMM_ENABLE_INSTRUCTIONS": "AVX2" if target == "x86_avx2" else None}


def test_one_row_per_int8_run_with_recipe_bits_and_overflow(grids) -> None:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame([_row(1.0, "x86_vnni", None, 8, 0.01), _row(0.5, "x86_avx2", "weights7", 7, 0.0),
                          {"quant.precision": "float", "model.width_mult": 0.5}])
    table = grids.grid_table(frame)
    assert table["recipe"].tolist() == ["x86_avx2 (weights7)", "x86_vnni"]  # sorted by width; float left out
    assert table["bits"].tolist() == ["w7a8", "w8a8"] and table["overflow"].tolist() == [0.0, 1.0]
    assert table["host"].tolist() == ["avx2 fma (FBGEMM_ENABLE_INSTRUCTIONS=AVX2)", "avx2 fma"]
    text = grids.markdown(table)
    assert text.count("\n") == 4 and "| 0.5 | x86_avx2 (weights7) | w7a8 |" in text


def test_readme_block_is_replaced_between_its_markers() -> None:
    from qat.analysis.readme import replace_block
    from qat.errors import QatError

    once = replace_block("intro\n<!-- T -->\nrest\n", "T", "| a |\n")
    assert once == "intro\n<!-- T -->\n| a |\n<!-- /T -->\nrest\n"
    assert replace_block(once, "T", "| b |\n") == once.replace("| a |", "| b |")
    with pytest.raises(QatError, match="no <!-- T --> marker"):
        replace_block("no marker here", "T", "| a |\n")
