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
    assert set(accuracy["blind_prior"]) == set(accuracy["per_type"]) | {"overall"}
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


def test_blind_prior_picks_the_option_most_often_right_for_the_same_question():
    from med2e3.data.datasets import Example, closed_prompt
    from med2e3.demo import blind_prior

    def ex(i: int, question: str, kind: str, options: list[str], letter: str) -> Example:
        answer = f"{letter}. {options['ABCD'.index(letter)]}"
        return Example(
            f"q{i}",
            "v.nii.gz",
            "vqa_closed",
            question,
            closed_prompt(question, options),
            answer,
            kind,
            letter,
        )

    planes = ["Axial", "Coronal", "Sagittal", "Oblique"]
    phases = ["Arterial phase", "Non-contrast", "Portal venous phase", "Delayed phase"]
    train = [
        ex(0, "Which plane?", "Plane", planes, "A"),
        ex(1, "Which plane?", "Plane", planes[::-1], "D"),
        ex(2, "Which plane?", "Plane", planes, "B"),
        ex(3, "What phase?", "Phase", phases, "A"),
        ex(4, "What phase, please?", "Phase", phases, "B"),
        ex(5, "What phase, please?", "Phase", phases, "B"),
    ]
    test = [
        ex(6, "Which plane?", "Plane", planes[::-1], "D"),  # right: Axial is this text's most frequent answer
        ex(7, "Which plane?", "Plane", planes, "B"),  # wrong
        ex(8, "What phase?", "Phase", phases[::-1], "D"),  # right by its own text, not by the type's
        ex(9, "Phase of the scan?", "Phase", phases, "B"),  # new text: the type's majority, right
        ex(10, "Which plane?", "Plane", ["Coronal", "Oblique", "Sagittal", "Axial"], "A"),  # wrong: Axial (D)
    ]
    assert blind_prior(train, test) == {"Plane": 1 / 3, "Phase": 1.0, "overall": 0.6}
