"""scripts/pivot_table.py: a README table pivoted from a results CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def script():  # type: ignore[no-untyped-def]
    return load_script("scripts/pivot_table.py")


def _results(tmp_path: Path) -> Path:
    rows = [{"quant.bn_fold": fold, "batch": batch, "freeze": freeze, "top1": top1, "host.cpu": "AMD EPYC",
             "host.cores": 2, "host.cpu_flags": "['avx2']", "quant.precision": "int8"}
            for fold, batch, freeze, top1 in [("jacob", 16, None, 55.9), ("jacob", 64, None, 57.9),
                                              ("jacob", 16, 0.0, 61.0), ("jacob", 16, 0.0, 61.4),
                                              ("unfolded", 16, None, 54.8)]]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_cells_are_means_per_combination_and_the_readme_block_is_replaced(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    csv = _results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- T -->\nold\n<!-- /T -->\nb\n")
    args = [str(csv), "--rows", "quant.bn_fold", "--cols", "batch", "freeze", "--value", "top1", "--readme",
            str(readme), "--marker", "T"]
    assert script.main(args) == 0
    text = readme.read_text()
    assert "| quant.bn_fold | batch=16, freeze=0 | batch=16, freeze=none | batch=64, freeze=none |" in text
    assert "| jacob | 61.2 (n=2) | 55.9 | 57.9 |" in text and "| unfolded |  | 54.8 |  |" in text
    assert "AMD EPYC" in text and "scripts/pivot_table.py" in text and "\nold\n" not in text


def test_ci_column_is_the_student_t_interval_over_each_rows_runs(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = script.pivot(pd.read_csv(_results(tmp_path)), ["quant.bn_fold"], ["batch"], "top1", ci=True)
    jacob = table[table["quant.bn_fold"] == "jacob"]["mean ± 95% CI"].item()
    # 55.9, 57.9, 61.0, 61.4: mean 59.05 (59.05000000000001 in float), std 2.619, t(0.975, 3) = 3.182: ± 4.17
    assert jacob == "59.1 ± 4.2 (n=4)"
    assert table[table["quant.bn_fold"] == "unfolded"]["mean ± 95% CI"].item() == "54.8 (n=1)"


def test_an_unknown_column_is_one_line(script, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert script.main([str(_results(tmp_path)), "--rows", "nope", "--cols", "batch", "--value", "top1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err


def test_a_per_engine_table_is_headed_by_the_runs_beside_it(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """fidelity.csv has one row per (run, engine) and no host columns: the count and the host come from the
    results.csv that experiments/report.py wrote beside it."""
    _results(tmp_path)
    fidelity = tmp_path / "fidelity.csv"
    pd.DataFrame([{"configuration": "c", "engine": e, "agreement_with_sim": a}
                  for e, a in [("reference", 99.9), ("onnxruntime", 99.7)]]).to_csv(fidelity, index=False)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- F -->\n<!-- /F -->\n")
    args = [str(fidelity), "--rows", "configuration", "--cols", "engine", "--value", "agreement_with_sim",
            "--readme", str(readme), "--marker", "F"]
    assert script.main(args) == 0
    text = readme.read_text()
    assert "(5 runs), host: AMD EPYC" in text and "| c | 99.7 | 99.9 |" in text
