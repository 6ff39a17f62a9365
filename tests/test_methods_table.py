"""scripts/methods_table.py: the README's PTQ-vs-QAT table from results/methods/results.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def script():  # type: ignore[no-untyped-def]
    return load_script("scripts/methods_table.py")


def _row(method: str, seed: int, top1: float, bits: tuple[int, int] = (8, 8), **extra: object) -> dict[str, object]:
    return {"method": method, "seed": seed, "accuracy.top1": top1, "quant.weight_bits": bits[0],
            "quant.act_bits": bits[1], "host.cpu": "AMD EPYC", "host.cores": 2, "host.cpu_flags": "['avx2']",
            "status": "ok", **extra}


def test_cells_are_mean_ci_and_the_paired_change_against_the_same_seeds_float(script) -> None:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame([
        _row("float", 0, 60.0, (32, 32)), _row("float", 1, 50.0, (32, 32)),
        _row("ptq_minmax", 0, 59.0), _row("ptq_minmax", 1, 47.0),
        _row("qat", 0, 40.0, (4, 4), **{"accuracy.sim_top1": 42.0}),
        _row("ptq_mse", 1, float("nan"), (4, 8), status="simulated_only", **{"accuracy.sim_top1": 45.0}),
    ])
    table = script.methods_table(frame).set_index("method")
    # n = 2: half-width t(0.975, 1) · std / sqrt(2) = 12.706 · std / 1.414
    assert table.loc["float", "W8A8"] == "55.0 ± 63.5 (+0.0 ± 0.0)"
    # changes -1 and -3 (paired by seed), not 53 - 55
    assert table.loc["min/max (PTQ)", "W8A8"] == "53.0 ± 76.2 (-2.0 ± 12.7)"
    assert table.loc["QAT (EMA ranges)", "W4A4"] == "40.0 (-20.0)" and table.loc["QAT (EMA ranges)", "W8A8"] == ""
    assert table.loc["MMSE (PTQ)", "W4A8"] == "45.0 (-5.0)†"  # simulated only: its simulated top-1, marked
    assert list(table.index) == ["float", "min/max (PTQ)", "MMSE (PTQ)", "QAT (EMA ranges)"]
    assert list(table.columns) == ["W8A8", "W4A8", "W4A4"]


def test_learned_step_qat_is_its_own_row_and_columns_are_the_bits_that_ran(script) -> None:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame([
        _row("float", 0, 60.0, (32, 32)),
        _row("qat", 0, 58.0, (7, 8)),  # a target that narrowed 8-bit weights: the column says what ran
        _row("qat", 0, 40.0, (4, 4), **{"quant.weight_observer": "minmax", "quant.act_observer": "ema"}),
        _row("qat", 0, 55.0, (4, 4), **{"quant.weight_observer": "lsq", "quant.act_observer": "lsq_plus"}),
        _row("qat", 0, 57.0, ("4/8", "4/8"), **{"quant.weight_observer": "lsq", "quant.act_observer": "lsq_plus"}),
    ])
    table = script.methods_table(frame).set_index("method")
    assert list(table.columns) == ["W7A8", "W4/8A4/8", "W4A4"]
    assert table.loc["float", "W7A8"] == "60.0 (+0.0)"
    assert table.loc["QAT (EMA ranges)", "W4A4"] == "40.0 (-20.0)"
    assert table.loc["QAT (LSQ: learned steps)", "W4A4"] == "55.0 (-5.0)"
    assert table.loc["QAT (LSQ: learned steps)", "W4/8A4/8"] == "57.0 (-3.0)"


def test_readme_block_is_replaced_and_a_missing_results_dir_is_one_line(script, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "methods"
    out.mkdir()
    pd.DataFrame([_row("float", 0, 60.0, (32, 32)), _row("qat", 0, 59.5)]).to_csv(out / "results.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- METHODS_TABLE -->\nold\n<!-- /METHODS_TABLE -->\nafter\n")
    assert script.main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| QAT (EMA ranges) | 59.5 (-0.5) |" in text
    assert "AMD EPYC" in text and text.endswith("after\n")
    assert (out / "methods_table.md").read_text() in text
    capsys.readouterr()
    assert script.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


def test_a_second_hosts_table_goes_into_its_own_block(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "methods_vnni"
    out.mkdir()
    pd.DataFrame([_row("float", 0, 60.0, (32, 32)), _row("qat", 0, 58.0)]).to_csv(out / "results.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- METHODS_TABLE -->\nfirst\n<!-- /METHODS_TABLE -->\n"
                      "<!-- METHODS_TABLE_VNNI -->\nold\n<!-- /METHODS_TABLE_VNNI -->\n")
    assert script.main([str(out), "--readme", str(readme), "--marker", "METHODS_TABLE_VNNI"]) == 0
    text = readme.read_text()
    assert "first" in text and "old" not in text and "| QAT (EMA ranges) | 58.0 (-2.0) |" in text
    assert f"methods_table.py {out.as_posix()} --readme README.md --marker METHODS_TABLE_VNNI" in text
