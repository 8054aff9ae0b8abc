"""`med2e3 demo` end to end at a toy budget: what it measures lands in summary.json."""

from __future__ import annotations

import json

from med2e3.demo import DemoBudget, run_demo


def test_demo_reports_accuracy_image_reliance_and_tgis(tmp_path):
    budget = DemoBudget(
        volumes=20, pretrain_epochs=0.02, finetune_epochs=0.01, batch_size=2, eval_questions=12
    )
    summary = run_demo(tmp_path / "demo", seed=0, budget=budget)
    assert summary == json.loads((tmp_path / "demo" / "summary.json").read_text())
    accuracy = summary["closed_vqa_accuracy"]
    assert accuracy["n"] == 12 and 0.0 <= accuracy["overall"] <= 1.0
    reliance = summary["image_reliance"]
    assert reliance["n_closed"] == 12
    assert reliance["accuracy"]["overall"] == accuracy["overall"]  # the same questions, the same answers
    assert reliance["loss"] > 0 and reliance["loss_swapped"] > 0
    tgis = accuracy["tgis"]
    assert tgis["question_dependence"] is not None
    assert set(tgis["relevant_mass"]) == set(tgis["uniform_mass"]) >= {"overall"}
    assert (tmp_path / "demo" / "tgis.png").is_file()
    info = tmp_path / "demo" / "finetune" / "training_info.json"
    before = info.read_bytes(), info.stat().st_mtime_ns
    again = run_demo(tmp_path / "demo", seed=0, budget=budget)  # rerun: trained stages are reused as they are
    assert (info.read_bytes(), info.stat().st_mtime_ns) == before
    assert again["closed_vqa_accuracy"] == accuracy
