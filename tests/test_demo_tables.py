"""scripts/demo_tables.py: the README's demo tables from results/demo/results.csv (as make demo writes it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():  # type: ignore[no-untyped-def]
    return load_script("scripts/demo_tables.py")


def _results(tmp_path: Path) -> Path:
    host = {"host.cpu": "AMD EPYC", "host.cores": 2, "host.cpu_flags": "['avx2', 'fma']", "quant.act_bits": 8}
    rows = [{**host, "model.width_mult": 0.5, "quant.precision": "float", "accuracy.top1": 70.0,
             "latency.median_ms": 2.0, "latency.engine": "torch_eager", "quant.weight_bits": 32},
            {**host, "model.width_mult": 0.5, "quant.precision": "int8", "accuracy.top1": 69.5,
             "accuracy.sim_top1": 69.4, "latency.median_ms": 1.0, "latency.engine": "torch_native_x86",
             "quant.weight_bits": 7, "target.name": "x86_avx2", "target.chosen": "auto",
             "fidelity.primary_engine": "torch_native_x86",
             "fidelity.engines.torch_native_x86.status": "ok", "fidelity.engines.torch_native_x86.top1": 69.5,
             "fidelity.engines.torch_native_x86.agreement_with_sim": 99.0,
             "fidelity.engines.reference.status": "ok", "fidelity.engines.reference.top1": 69.4,
             "fidelity.engines.reference.agreement_with_sim": 100.0,
             "fidelity.engines.onnxruntime.status": "unsupported"}]
    out = tmp_path / "demo"
    out.mkdir()
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    return out


def test_tables_and_readme_blocks_come_from_the_results(tables, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = _results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# demo\n<!-- DEMO_TABLE -->\ntext\n<!-- DEMO_FIDELITY_TABLE -->\n")
    assert tables.main([str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| 0.5 | 70.0 | 69.5 (69.4) | w7a8 | 0.5 | 2.00 | 1.00 | torch_native_x86 | 2.00× |" in text
    assert "avx2" in text and "target x86_avx2" in text  # the records' host and target head each table
    engines = [line.split(" | ")[1] for line in (results / "fidelity_table.md").read_text().splitlines()
               if line.startswith("| 0.5 ")]
    assert engines == ["torch_native_x86", "reference"]  # primary first, the unsupported engine left out


def test_missing_results_is_one_line(tables, tmp_path: Path,  # type: ignore[no-untyped-def]
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert tables.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "run make demo first" in err and "\n" not in err


def test_a_second_demo_gets_its_own_blocks_with_its_command_wall_time_and_kernel_restriction(  # type: ignore[no-untyped-def]
        tables, tmp_path: Path) -> None:
    results = _results(tmp_path)
    frame = pd.read_csv(results / "results.csv")
    frame["target.isa_overrides.FBGEMM_ENABLE_INSTRUCTIONS"] = "AVX2"
    frame.to_csv(results / "results.csv", index=False)
    (results / "wall_time.txt").write_text("make demo: 250 s wall time (6 runs and the report)\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- DEMO_TABLE -->\nvnni\n<!-- /DEMO_TABLE -->\n<!-- DEMO_TABLE_AVX2 -->\n"
                      "<!-- DEMO_FIDELITY_TABLE_AVX2 -->\n")
    command = "FBGEMM_ENABLE_INSTRUCTIONS=AVX2 make demo"
    assert tables.main([str(results), "--readme", str(readme), "--readme-suffix", "_AVX2", "--command", command]) == 0
    text = readme.read_text()
    assert text.startswith("<!-- DEMO_TABLE -->\nvnni\n<!-- /DEMO_TABLE -->\n")  # the first demo's block is kept
    head = text.split("<!-- DEMO_TABLE_AVX2 -->\n")[1].splitlines()[0]
    assert head.startswith(f"Measured by `{command}` (250 s wall time (6 runs and the report)), host: AMD EPYC")
    assert "avx2 (FBGEMM_ENABLE_INSTRUCTIONS=AVX2) — target x86_avx2" in head and "--readme-suffix _AVX2" in head
    assert "<!-- /DEMO_FIDELITY_TABLE_AVX2 -->" in text
