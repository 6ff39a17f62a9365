"""Issue 22 item 4: ``data.val_max_images`` evaluates on a seeded, class-stratified subset of the validation set,
the same for the same seed whatever the run's seed, recorded in the record and marked in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY_CLASSIFICATION, overrides

from qat.analysis import write_report
from qat.data.imagefolder import build_classification_loaders
from qat.data.subset import class_quotas, stratified_indices
from qat.data.synthetic import make_demo_dataset
from qat.errors import QatError

ROOT = Path(__file__).resolve().parents[1]


def test_quotas_give_every_class_one_image_then_shares_by_size() -> None:
    assert class_quotas([50] * 4, 10) == [3, 3, 2, 2]  # balanced: equal shares, remainders to the first classes
    assert class_quotas([10, 30, 60], 10) == [1, 3, 6]
    assert class_quotas([1, 1, 100], 5) == [1, 1, 3]  # a class never gets more than it has
    assert class_quotas([5, 5], 2) == [1, 1]
    assert sum(class_quotas([7, 13, 2, 40, 9], 37)) == 37


def test_subset_is_seeded_stratified_sorted_and_covers_every_class() -> None:
    targets = [c for c in range(10) for _ in range(50)][::-1]  # classes in any order in the split
    subset = stratified_indices(targets, 100, seed=0)
    assert subset == sorted(subset) and len(set(subset)) == 100
    assert Counter(targets[i] for i in subset) == dict.fromkeys(range(10), 10)
    assert stratified_indices(targets, 100, seed=0) == subset
    assert stratified_indices(targets, 100, seed=1) != subset
    assert stratified_indices(targets, 500, seed=0) == list(range(500))  # the whole split
    with pytest.raises(QatError, match=r"data.val_max_images: 9 images cannot cover .* 10 classes"):
        stratified_indices(targets, 9, seed=0)


def test_loader_keeps_the_subset_and_describes_it(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path, seed=0, num_classes=3, train_per_class=2, val_per_class=4, image_size=16)
    data = build_classification_loaders(root, resolution=8, batch_size=4, val_max_images=6, val_subset_seed=3)
    assert data.val_subset == {"images": 6, "of": 12, "seed": 3, "stratified_by": "class"}
    labels = [int(y) for _, y in data.val.dataset]
    assert Counter(labels) == {0: 2, 1: 2, 2: 2} and len(list(data.val)) == 2
    whole = build_classification_loaders(root, resolution=8, batch_size=4)
    assert whole.val_subset is None and len(whole.val.dataset) == 12
    train, val, classes = data  # still unpacks as before
    assert len(classes) == 3 and val is data.val


@pytest.mark.slow
def test_run_records_the_subset_and_the_report_marks_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "subset"
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache")}
    args = overrides(TINY_CLASSIFICATION, {"quant": "float", "data.val_max_images": 12, "train.keep_best": False})
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args,
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["data"]["val_size"] == 12
    assert record["data"]["val_subset"] == {"images": 12, "of": 32, "seed": 0, "stratified_by": "class"}
    write_report(tmp_path / "runs", tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| validation images |" in summary and "subset 12 (seed 0)" in summary
    assert "**validation images**" in summary
