"""The main job on real Fashion-MNIST (Debian's dataset-fashion-mnist files), shrunk to seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs `apt-get install dataset-fashion-mnist` (CI installs it)")
def test_demo_trains_teacher_and_three_students_and_prints_a_table(tmp_path, capsys):
    from ickd.demo import main

    rows = main(["--out", str(tmp_path), "--study-trials", "2", "dataset.train_subset=2000", "dataset.val_subset=1000", "trainer.epochs=2", "trainer.batch_size=32"])
    assert [r["run"] for r in rows][:4] == ["teacher (resnet14)", "CE", "KD", "IC-KD"]
    assert rows[4]["run"].startswith("IC-KD (study best): k=")
    for r in rows:
        assert r["status"] == "completed" and r["best_top1"] > 40.0  # 10 classes: chance is 10%
    printed = capsys.readouterr().out
    assert "| IC-KD |" in printed and "2000 training images" in printed and "ickd train experiment=fashion_mnist/demo dataset.train_subset=2000" in printed and " distill=ickd teacher.checkpoint=" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 5
    assert summary["study"]["states"].get("COMPLETE", 0) + summary["study"]["states"].get("PRUNED", 0) == 2
    assert (tmp_path / "studies" / "demo" / "journal.log").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # IC-KD really retrieved from a bank of the 2000 training images.
    last = json.loads((tmp_path / "ickd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bank_entries"] == 2000 and last["train/pos_frac"] > 0.5
