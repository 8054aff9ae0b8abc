"""Evaluation runner: id matching, bad input named, per-type scores, Markdown/JSON, CLI, end to end."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from med2e3.cli import build_parser
from med2e3.data.datasets import Example
from med2e3.errors import ConfigError, DatasetError
from med2e3.evaluation import ablation
from med2e3.evaluation.runner import EvalReport, evaluate, load_dataset, predict_examples


def closed(i: int, qtype: str, letter: str, relevant: tuple[int, ...] | None = None) -> Example:
    return Example(
        id=f"c{i}",
        volume=Path(f"/data/v{i % 2}.nii.gz"),
        task="vqa_closed",
        question=f"question {i}?",
        prompt=f"question {i}? Choices: A. a B. b C. c D. d",
        answer=f"{letter}. {letter.lower()}",
        question_type=qtype,
        answer_letter=letter,
        relevant_slices=relevant,
    )


def open_q(i: int, qtype: str, answer: str) -> Example:
    return Example(
        id=f"o{i}",
        volume=Path("/data/v0.nii.gz"),
        task="vqa_open",
        question=f"open {i}?",
        prompt=f"open {i}?",
        answer=answer,
        question_type=qtype,
    )


def report_ex(i: int, text: str) -> Example:
    return Example(
        id=f"r{i}",
        volume=Path("/data/v0.nii.gz"),
        task="caption",
        question="Report.",
        prompt="Report.",
        answer=text,
    )


# closed: Plane 2/2, Organ 1/3 -> overall 3/5
CASES = [
    (closed(0, "Plane", "A"), "A. axial"),
    (closed(1, "Plane", "B"), "The answer is B. b"),
    (closed(2, "Organ", "C"), "A. liver"),
    (closed(3, "Organ", "D"), "D. spleen"),
    (closed(4, "Organ", "A"), ""),
    (open_q(5, "Phase", "Arterial phase"), "Arterial phase"),
    (open_q(6, "Abnormality", "Cyst"), "Solid mass"),
    (report_ex(7, "The liver is normal."), "The liver is normal."),
]


def write_predictions(path: Path, rows: list[dict], broken_at: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if broken_at is not None:
        lines.insert(broken_at - 1, '{"id": "x", "answer": ')
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_for(cases, scores=None) -> list[dict]:
    return [
        {"id": ex.id, "volume": str(ex.volume), "answer": ans, "slice_scores": (scores or {}).get(ex.id)}
        for ex, ans in cases
    ]


@pytest.fixture
def case_files(tmp_path: Path) -> tuple[Path, list[Example]]:
    return write_predictions(tmp_path / "pred.jsonl", rows_for(CASES)), [ex for ex, _ in CASES]


def test_closed_accuracy_per_type_and_overall(case_files):
    path, examples = case_files
    report = evaluate(path, examples)
    assert report.closed["per_type"] == {"Plane": 1.0, "Organ": pytest.approx(1 / 3)}
    assert report.closed["overall"] == pytest.approx(3 / 5)
    assert report.closed["counts"] == {"Plane": 2, "Organ": 3}
    correct = {s["id"]: s["correct"] for s in report.samples if "correct" in s}
    assert correct == {"c0": True, "c1": True, "c2": False, "c3": True, "c4": False}


def test_text_metrics_per_task_and_type(case_files):
    path, examples = case_files
    report = evaluate(path, examples)
    assert report.open.n == 2 and report.report.n == 1
    assert report.open.per_type["Phase"]["rouge1"] == pytest.approx(1.0)
    assert report.open.per_type["Abnormality"]["bleu1"] == 0.0
    assert report.report.means["bleu1"] == pytest.approx(1.0)
    assert "bertscore_f1" in report.report.not_computed


def test_matching_is_by_id_not_position(tmp_path, case_files):
    path, examples = case_files
    rows = rows_for(CASES)
    random.Random(3).shuffle(rows)
    shuffled = write_predictions(tmp_path / "shuffled.jsonl", rows)
    a = evaluate(path, examples).to_dict()
    b = evaluate(shuffled, list(reversed(examples))).to_dict()
    key = lambda s: s["id"]  # noqa: E731
    assert sorted(a.pop("samples"), key=key) == sorted(b.pop("samples"), key=key)
    assert a == b


def test_missing_and_extra_ids_are_named(tmp_path):
    rows = rows_for(CASES[1:]) + [{"id": "zz9", "answer": "A."}]
    path = write_predictions(tmp_path / "p.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        evaluate(path, [ex for ex, _ in CASES])
    message = str(err.value)
    assert "'c0'" in message and "no prediction" in message
    assert "'zz9'" in message and "not in the dataset" in message


def test_broken_line_is_named(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", rows_for(CASES), broken_at=3)
    with pytest.raises(DatasetError) as err:
        evaluate(path, [ex for ex, _ in CASES])
    assert err.value.row == 3 and "p.jsonl" in str(err.value) and "not valid JSON" in str(err.value)


def test_repeated_prediction_id_is_named(tmp_path):
    rows = rows_for(CASES) + [rows_for(CASES)[0]]
    with pytest.raises(DatasetError, match=r"row 9.*appears twice"):
        evaluate(write_predictions(tmp_path / "p.jsonl", rows), [ex for ex, _ in CASES])


def test_failed_batch_row_is_named(tmp_path):
    rows = rows_for(CASES)
    rows[2] = {"id": rows[2]["id"], "volume": "v.nii.gz", "question": "q", "error": "v.nii.gz: no such file"}
    with pytest.raises(DatasetError, match=r"row 3.*failed: v.nii.gz: no such file"):
        evaluate(write_predictions(tmp_path / "p.jsonl", rows), [ex for ex, _ in CASES])


def test_unknown_question_type_names_the_row(tmp_path, case_files):
    volume = tmp_path / "v.nii.gz"
    volume.write_bytes(b"")
    header = "Image Path,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice"
    good = "v.nii.gz,1,Which plane?,Axial,Coronal,Sagittal,Oblique,Axial,A"
    bad = "v.nii.gz,7,Which plane?,Axial,Coronal,Sagittal,Oblique,Axial,A"
    csv_path = tmp_path / "vqa.csv"
    csv_path.write_text(f"{header}\n{good}\n{bad}\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(csv_path)
    assert err.value.row == 3 and "question type" in str(err.value)

    path, examples = case_files  # an Example built around the validation still fails clearly
    odd = closed(0, "Plane", "A")
    object.__setattr__(odd, "question_type", "Texture")
    with pytest.raises(DatasetError, match=r"row 1.*unknown question type 'Texture'"):
        evaluate(path, [odd, *examples[1:]])


def test_markdown_and_json_written(tmp_path, case_files):
    path, examples = case_files
    report = evaluate(path, examples)
    md = report.to_markdown()
    for row in ("| Plane | 2 | 1.0000 |", "| Organ | 3 | 0.3333 |", "| **overall** | 5 | 0.6000 |"):
        assert row in md
    assert "## Open VQA" in md and "| Phase | 1 |" in md and "## Report generation" in md
    report.write(tmp_path / "r.json", tmp_path / "r.md")
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["samples"]) == len(examples) and data["closed_vqa"]["overall"] == pytest.approx(0.6)
    assert (tmp_path / "r.md").read_text() == md
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_eval_subcommand(tmp_path, case_files, capsys):
    import dataclasses

    from med2e3.data.datasets import write_conversations

    path, examples = case_files
    jsonl = tmp_path / "dataset.jsonl"
    for name in ("v0.nii.gz", "v1.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # the reader checks that volumes exist; nothing loads them
    write_conversations([dataclasses.replace(e, volume=tmp_path / e.volume.name) for e in examples], jsonl)
    parser = build_parser()
    args = parser.parse_args(
        [
            "eval",
            str(path),
            "--dataset",
            str(jsonl),
            "--out",
            str(tmp_path / "o.json"),
            "--markdown",
            str(tmp_path / "o.md"),
        ]
    )
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "o.json").read_text())["closed_vqa"]["overall"] == pytest.approx(0.6)
    assert "| Organ | 3 | 0.3333 |" in capsys.readouterr().out
    assert parser.parse_args(["ablation", "runs/x", "--seeds", "0", "1", "2"]).seeds == [0, 1, 2]


# ------------------------------------------------------------------------------------ end to end


def test_predict_then_evaluate_end_to_end(tmp_path, tiny_model_dir):
    from med2e3.data.synth import generate_benchmark
    from med2e3.inference import Med2E3Predictor

    bench = tmp_path / "synth"
    generate_benchmark(bench, 2, seed=0, workers=1, progress=False)
    vqa = load_dataset(bench / "M3D_VQA_train.csv", form="both", orientation="acquisition")
    caps = load_dataset(bench / "M3D_Cap.json", split="train", orientation="acquisition")
    examples = (
        [e for e in vqa if e.task == "vqa_closed"][:4] + [e for e in vqa if e.task == "vqa_open"][:2] + caps
    )
    predictor = Med2E3Predictor.from_pretrained(
        tiny_model_dir, device="cpu"
    )  # orientation "axial" by default
    out = tmp_path / "pred.jsonl"
    assert predict_examples(predictor, examples, out, max_new_tokens=3, progress=False) == len(examples)
    assert predictor.orientation == "axial"  # restored after predicting with "acquisition"
    assert predict_examples(predictor, examples, out, max_new_tokens=3, progress=False) == 0  # resumed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    first = examples[0]
    assert by_id[first.id]["question"] == first.question  # TG-IS read the bare question
    report = evaluate(out, examples)
    assert isinstance(report, EvalReport)
    missing = replace(examples[0], id="gone", volume=tmp_path / "gone.nii.gz")
    with pytest.raises(DatasetError, match="1 examples failed"):  # recorded, the others answered
        predict_examples(predictor, [*examples, missing], out, max_new_tokens=3, progress=False)
    assert "gone.nii.gz" in json.loads(out.read_text().splitlines()[-1])["error"]
    assert report.closed["n"] == 4 and report.open.n == 2 and report.report.n == 2
    assert report.attention is not None and report.attention.counts["overall"] == 6
    assert 0.0 <= report.attention.mass["overall"] <= 1.0


# ------------------------------------------------------------------------------------ ablation table


def test_ablation_table_and_markers(tmp_path):
    def summary(acc: float) -> dict:
        return {
            "closed_vqa": {"overall": acc, "per_type": {"Plane": acc}},
            "open_vqa": {"means": {"bleu1": 0.5, "rouge1": 0.5, "meteor": 0.5}},
            "report_generation": None,
            "attention": {"mass": {"overall": 0.3}, "uniform": {"overall": 0.25}},
        }

    table = ablation.results_table({"none": {0: summary(0.2), 1: summary(0.4)}, "tgis": {0: summary(0.5)}})
    assert "| Closed VQA: overall | 30.0 ± 14.1 | 50.0 ± 0.0 |" in table
    assert "| Report: bleu1 | n/a | n/a |" in table
    mean = summary(0.3) | {"attention": {"mass": {}, "question_dependence": 0.0}}
    tgis = summary(0.5) | {"attention": {"mass": {}, "question_dependence": 1.234e-5}}
    tgis["image_reliance"] = {"accuracy_swapped": {"overall": 0.25}, "loss": 0.1234, "loss_swapped": 1.5}
    rows = ablation.results_table({"none": {0: summary(0.2)}, "mean": {0: mean}, "tgis": {0: tgis}})
    assert "| TG-IS question dependence (median over volumes) | n/a | 0 ± 0 | 1.23e-05 ± 0 |" in rows
    assert "| Image reliance: closed overall, swapped volume | n/a | n/a | 25.0 ± 0.0 |" in rows
    assert "| Image reliance: answer loss, own volume | n/a | n/a | 0.123 ± 0 |" in rows
    results = tmp_path / "results.md"
    old = f"{ablation.SIGNATURE} (complete) old table_"
    results.write_text(f"# Results\n\nintro\n\n{ablation.BEGIN}\n{old}\n{ablation.END}\n\ndiscussion\n")
    ablation.write_results(results, table, ablation.AblationSettings(), 60.0, complete=True)
    text = results.read_text()
    assert "intro" in text and "discussion" in text and "old table" not in text and "30.0 ± 14.1" in text


def test_ablation_budgets_identical_across_variants(tmp_path):
    from med2e3.training import load_config

    settings = ablation.AblationSettings()
    configs = {}
    for variant in ablation.VARIANTS:
        for stage, name in (("pretrain", "tiny-pretrain.yaml"), ("finetune", "tiny-finetune.yaml")):
            o = ablation.stage_overrides(stage, tmp_path / variant, tmp_path / "synth", variant, 1, settings)
            cfg = load_config(settings.configs_dir / name, o)
            assert cfg.model.slice_aggregation == variant and cfg.seed == 1
            configs[(variant, stage)] = (cfg.max_steps, cfg.batch_size, cfg.lr, len(cfg.data.train))
    for stage in ("pretrain", "finetune"):
        assert len({configs[(v, stage)] for v in ablation.VARIANTS}) == 1


def test_ablation_jobs_run_every_pair_once_in_parallel_workers(tmp_path, monkeypatch):
    import os
    import time

    trained = tmp_path / "trained"
    trained.mkdir()

    def fake_train(run, data, variant, seed, settings):
        time.sleep(0.3)  # long enough that both workers take runs
        (trained / f"{variant}-{seed}-{os.getpid()}").touch()
        return run / "finetune"

    def fake_evaluate(run, subsets, settings):
        acc = {"none": 0.2, "mean": 0.3, "tgis": 0.4}[run.name.split("-")[0]]
        return {"closed_vqa": {"overall": acc, "per_type": {}}, "attention": None}

    monkeypatch.setattr(ablation, "prepare_benchmark", lambda out, settings: out / "synth")
    monkeypatch.setattr(ablation, "eval_examples", lambda data, settings: {})
    monkeypatch.setattr(ablation, "train_run", fake_train)
    monkeypatch.setattr(ablation, "evaluate_run", fake_evaluate)
    settings = ablation.AblationSettings(seeds=(0, 1), jobs=2)
    path = ablation.run_ablation(tmp_path / "out", settings, tmp_path / "results.md")
    runs = [name.rsplit("-", 1) for name in os.listdir(trained)]
    assert sorted(r[0] for r in runs) == sorted(f"{v}-{s}" for v in ablation.VARIANTS for s in (0, 1))
    assert len({pid for _, pid in runs}) == 2 and str(os.getpid()) not in {pid for _, pid in runs}
    text = path.read_text()
    assert "(complete)" in text and '"jobs": 2' in text
    assert "| Closed VQA: overall | 20.0 ± 0.0 | 30.0 ± 0.0 | 40.0 ± 0.0 |" in text
    assert "none (seeds 0, 1)" in text and "tgis (seeds 0, 1)" in text


def test_an_interrupted_parallel_ablation_stops_its_runs_and_starts_no_other(tmp_path, monkeypatch):
    """SIGTERM to the parent and its two workers (as `timeout` sends it to the group): each run in progress
    stops as training does (here: raises TrainingInterrupted in its worker), no third run starts, the first
    interruption reaches the caller whole, and the parent's handlers are put back."""
    import os
    import signal
    import threading
    import time

    from med2e3 import stopping
    from med2e3.errors import TrainingInterrupted

    started = tmp_path / "started"
    started.mkdir()

    def fake_train(run, data, variant, seed, settings):
        (started / f"{variant}-{seed}-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while not stopping.requested() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise TrainingInterrupted(stopping.requested() or signal.SIGKILL, run / "pretrain" / "checkpoint-3")

    def terminate_when_both_started() -> None:
        deadline = time.monotonic() + 60
        while len(os.listdir(started)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        for name in os.listdir(started):
            os.kill(int(name.rsplit("-", 1)[1]), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ablation, "prepare_benchmark", lambda out, settings: out / "synth")
    monkeypatch.setattr(ablation, "eval_examples", lambda data, settings: {})
    monkeypatch.setattr(ablation, "train_run", fake_train)
    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_both_started, daemon=True).start()
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: stopped after saving .*checkpoint-3") as caught:
        ablation.run_ablation(tmp_path / "out", ablation.AblationSettings(seeds=(0, 1), jobs=2))
    assert caught.value.signum == signal.SIGTERM and caught.value.checkpoint.name == "checkpoint-3"
    assert len(os.listdir(started)) == 2  # of six runs
    assert signal.getsignal(signal.SIGTERM) == handler
    assert not (tmp_path / "out" / "results.md").exists()  # no run finished: no table, none marked complete


def test_ablation_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="jobs"):
        ablation.run_ablation(tmp_path, ablation.AblationSettings(jobs=0))


def test_cli_eval_reports_image_reliance_and_question_dependence(tmp_path, tiny_model_dir, capsys):
    from med2e3.cli import main
    from med2e3.data.synth import generate_benchmark

    bench = tmp_path / "synth"
    generate_benchmark(bench, 5, seed=0, workers=1, progress=False)
    out = tmp_path / "report.json"
    args = ["eval", str(tmp_path / "pred.jsonl"), "--dataset", str(bench / "M3D_VQA_train.csv")]
    args += ["--form", "closed", "--orientation", "acquisition", "--limit", "24", "--out", str(out)]
    assert main([*args, "--image-reliance"]) == 2  # needs --model
    assert "--image-reliance needs --model" in capsys.readouterr().err
    assert main([*args, "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--image-reliance"]) == 0
    report = json.loads(out.read_text())
    reliance = report["image_reliance"]
    assert reliance["n"] == reliance["n_closed"] == 24
    assert set(reliance["accuracy"]) == set(reliance["accuracy_swapped"]) >= {"overall"}
    assert reliance["loss"] > 0 and reliance["loss_swapped"] > 0
    assert reliance["loss"] != reliance["loss_swapped"]  # a random model still sees a different volume
    assert report["attention"]["question_dependence"] is not None
    assert "## Image reliance" in capsys.readouterr().out
