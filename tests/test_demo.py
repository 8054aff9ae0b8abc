"""`med2e3 demo` end to end at a toy budget: what it measures lands in summary.json."""

from __future__ import annotations

import json
import shutil

import pytest

from med2e3.demo import DemoBudget, run_demo
from med2e3.errors import ConfigError
from med2e3.folders import BUNDLED_TINY_MODEL, TRAINED_ON, named_folder

BUDGET = DemoBudget(volumes=20, pretrain_epochs=0.02, finetune_epochs=0.01, batch_size=2, eval_questions=12)


def test_demo_reports_accuracy_image_reliance_and_tgis(tmp_path):
    budget = BUDGET
    summary = run_demo(tmp_path / "demo", seed=0, budget=budget, start=None)
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
    assert summary["figure_questions"] == str(tmp_path / "demo" / "tgis_questions.png")
    assert (tmp_path / "demo" / "tgis_questions.png").is_file()
    info = tmp_path / "demo" / "finetune" / "training_info.json"
    before = info.read_bytes(), info.stat().st_mtime_ns
    again = run_demo(tmp_path / "demo", seed=0, budget=budget, start=None)  # trained stages are reused
    assert (info.read_bytes(), info.stat().st_mtime_ns) == before
    assert again["closed_vqa_accuracy"] == accuracy
    assert summary["start"] is None

    # from a trained model: measured before its fine-tune here, on the same questions
    start = tmp_path / "start"
    shutil.copytree(tmp_path / "demo" / "finetune", start, ignore=shutil.ignore_patterns("checkpoint-*"))
    tuned = run_demo(tmp_path / "tuned", seed=0, budget=budget, start=str(start))
    first = tuned["start"]
    assert first["model"] == str(start)
    assert first["closed_vqa_accuracy"]["n"] == tuned["closed_vqa_accuracy"]["n"] == 12
    assert first["image_reliance"]["accuracy"]["overall"] == first["closed_vqa_accuracy"]["overall"]
    settings = json.loads((tmp_path / "tuned" / "finetune" / "training_info.json").read_text())
    assert str(start) in json.dumps(settings)

    (start / TRAINED_ON).write_text(json.dumps({"data_seeds": [5, 0]}))  # its own volumes are not a test set
    with pytest.raises(ConfigError, match="--seed 0: .* trained on the volumes of this seed"):
        run_demo(tmp_path / "again", seed=0, budget=budget, start=str(start))
    assert not (tmp_path / "again").exists()


def test_the_shipped_model_refuses_its_own_data_seed(tmp_path):
    record = json.loads((named_folder(BUNDLED_TINY_MODEL) / TRAINED_ON).read_text())
    for seed in record["data_seeds"]:
        with pytest.raises(ConfigError, match=f"--seed {seed}: bundled:tiny_model"):
            run_demo(tmp_path / "demo", seed=seed)
    assert not (tmp_path / "demo").exists()
    with pytest.raises(ConfigError, match="bundled:nothing: no such bundled folder .*bundled:tiny_model"):
        named_folder("bundled:nothing")


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


def test_the_shipped_model_answers_from_the_scan(tmp_path):
    """On volumes it never saw, the shipped model's answers are likelier with their own scan than with
    another one, and a plane question gets a plane."""
    from med2e3.data.synth import benchmark_examples, generate_benchmark
    from med2e3.evaluation.reliance import image_reliance
    from med2e3.inference import Med2E3Predictor

    generate_benchmark(tmp_path / "data", 10, seed=7, progress=False)
    examples = benchmark_examples(tmp_path / "data", "vqa", "train", form="closed")
    predictor = Med2E3Predictor.from_pretrained(BUNDLED_TINY_MODEL)
    reliance = image_reliance(predictor, examples)
    assert reliance.loss < reliance.loss_swapped
    plane = next(ex for ex in examples if ex.question_type == "Plane")
    predictor.load(plane.volume)
    assert predictor.ask(plane.question, max_new_tokens=4).answer in {
        "Axial",
        "Coronal",
        "Sagittal",
        "Oblique",
    }
