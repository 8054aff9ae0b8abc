"""Evaluation and ablation reruns: reused runs match the settings, user files are never rewritten."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from med2e3.cli import main
from med2e3.data.datasets import Example, write_conversations
from med2e3.errors import ConfigError, OutputError
from med2e3.evaluation import ablation


def cli_error(capsys, *argv: str) -> str:
    """Run ``med2e3 ARGV``, expect exit status 2 and one line on stderr; return that line."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("med2e3: error: "), err
    return err


# ---- ablation: fake training and evaluation, real bookkeeping ------------------------------------
@pytest.fixture
def fake_runs(tmp_path, monkeypatch) -> list[str]:
    """Replace benchmark, training and evaluation by stand-ins; returns the log of what was done."""
    done: list[str] = []

    def fake_benchmark(out, settings):
        done.append("benchmark")
        return out / "synth"

    def fake_train(run, data, variant, seed, settings):
        done.append(f"train {variant}-{seed}")
        run.mkdir(parents=True, exist_ok=True)
        return run / "finetune"

    def fake_evaluate(run, subsets, settings):
        return {"closed_vqa": {"overall": 0.25, "per_type": {}}, "attention": None}

    monkeypatch.setattr(ablation, "prepare_benchmark", fake_benchmark)
    monkeypatch.setattr(ablation, "eval_examples", lambda data, settings: {})
    monkeypatch.setattr(ablation, "train_run", fake_train)
    monkeypatch.setattr(ablation, "evaluate_run", fake_evaluate)
    return done


def small(**changes) -> ablation.AblationSettings:
    base = {"seeds": (0,), "variants": ("tgis",), "pretrain_steps": 3, "finetune_steps": 3, "batch_size": 2}
    return ablation.AblationSettings(**{**base, **changes})


def test_ablation_reuses_runs_only_with_the_same_settings(tmp_path, fake_runs):
    out, results = tmp_path / "out", tmp_path / "results.md"
    ablation.run_ablation(out, small(), results)
    text = results.read_text()
    with pytest.raises(
        ConfigError, match=r"batch_size \(2 -> 4\), finetune_steps \(3 -> 60\), pretrain_steps"
    ):
        ablation.run_ablation(out, small(pretrain_steps=30, finetune_steps=60, batch_size=4), results)
    assert fake_runs == ["benchmark", "train tgis-0"] and results.read_text() == text  # nothing done

    ablation.run_ablation(out, small(seeds=(0, 1), jobs=1, threads=2), results)  # more seeds: same settings
    ablation.run_ablation(
        out, small(pretrain_steps=30, finetune_steps=60, batch_size=4), results, overwrite=True
    )
    assert 'batch_size": 4' in results.read_text()
    assert json.loads((out / ablation.SETTINGS_RECORD).read_text())["batch_size"] == 4
    assert not (out / "runs" / "tgis-seed1").exists()  # discarded with the other old runs


def test_ablation_checks_every_reused_stage_against_its_config(tmp_path, fake_runs):
    from med2e3.training.runs import record_settings

    out = tmp_path / "out"
    settings = small()
    ablation.run_ablation(out, settings, tmp_path / "results.md")
    run = out / "runs" / "tgis-seed0"
    for config in ablation.stage_configs(run, out / "synth", "tgis", 0, settings):
        config.lr *= 2  # as if trained before configs/tiny-*.yaml changed
        record_settings(config)
    with pytest.raises(ConfigError, match=r"pretrain holds a run started with other settings: lr \("):
        ablation.run_ablation(out, settings, tmp_path / "results.md")


def test_ablation_refuses_repeated_seeds_and_variants(tmp_path, fake_runs, capsys):
    assert "--seeds lists 0 more than once" in cli_error(
        capsys, "ablation", str(tmp_path / "a"), "--seeds", "0", "1", "0", "--jobs", "2"
    )
    with pytest.raises(ConfigError, match="--variants lists tgis more than once"):
        ablation.run_ablation(tmp_path / "b", small(variants=("tgis", "mean", "tgis")))
    assert fake_runs == [] and not (tmp_path / "a").exists()


def test_ablation_starting_points_are_checked_before_any_work(tmp_path, tiny_model_dir, fake_runs, capsys):
    import shutil

    def refused(*extra: str) -> str:
        return cli_error(capsys, "ablation", str(tmp_path / "out"), "--variants", "tgis", "mean", *extra)

    tgis = f"tgis={tiny_model_dir}"
    assert "no starting point for mean" in refused("--start", tgis)
    assert "slice_aggregation='tgis', not 'mean'" in refused(
        "--start", tgis, "--start", f"mean={tiny_model_dir}"
    )
    assert "expected VARIANT=FOLDER" in refused("--start", f"3d={tiny_model_dir}")
    assert "--start gives tgis more than once" in refused("--start", tgis, "--start", tgis)
    assert "does not exist" in refused("--start", tgis, "--start", f"mean={tmp_path / 'nowhere'}")
    only_tgis = ["ablation", str(tmp_path / "out"), "--variants", "tgis", "--start", tgis]
    err = cli_error(capsys, *only_tgis, "--start", f"none={tmp_path / 'nowhere'}")  # given: checked too
    assert "--start none does not exist" in err
    seen = tmp_path / "seen"
    shutil.copytree(tiny_model_dir, seen)
    (seen / "trained_on.json").write_text(json.dumps({"data_seeds": [7]}))
    err = cli_error(
        capsys,
        "ablation",
        str(tmp_path / "out"),
        "--variants",
        "tgis",
        "--data-seed",
        "7",
        "--start",
        f"tgis={seen}",
    )
    assert "--data-seed 7:" in err and "was trained on the volumes of this seed" in err
    (seen / "trained_on.json").write_text("[7]")
    err = cli_error(
        capsys, "ablation", str(tmp_path / "out"), "--variants", "tgis", "--start", f"tgis={seen}"
    )
    assert "trained_on.json: unreadable" in err
    assert fake_runs == [] and not (tmp_path / "out").exists()


def test_ablation_settings_without_starting_points_record_no_starts():
    assert "starts" not in ablation.AblationSettings().result_settings()  # folders from before stay reusable
    assert ablation.AblationSettings(starts={"tgis": "x"}).result_settings()["starts"] == {"tgis": "x"}


def test_ablation_from_starting_points_fine_tunes_them_and_measures_image_reliance(tmp_path, tiny_model_dir):
    """A real run, one variant, two steps: stage 1 is skipped, the table gains image reliance rows."""
    settings = ablation.AblationSettings(
        volumes=20,
        seeds=(0,),
        variants=("tgis",),
        finetune_steps=2,
        batch_size=2,
        closed_eval=40,  # the test split's first two volumes at least
        open_eval=1,
        report_eval=1,
        starts={"tgis": str(tiny_model_dir)},
    )
    path = ablation.run_ablation(tmp_path / "out", settings, tmp_path / "results.md")
    run = tmp_path / "out" / "runs" / "tgis-seed0"
    assert not (run / "pretrain").exists() and (run / "finetune" / "model.safetensors").is_file()
    summary = json.loads((run / "eval.json").read_text())
    reliance = summary["image_reliance"]
    assert reliance["n_closed"] > 12 and reliance["loss"] > 0 and reliance["loss_swapped"] > 0
    text = path.read_text()
    swapped = 100 * reliance["accuracy_swapped"]["overall"]
    assert f"| Image reliance: closed overall, swapped volume | {swapped:.1f} ± 0.0 |" in text
    assert f"| Image reliance: answer loss, own volume | {reliance['loss']:.3g} ± 0 |" in text
    closed = ablation.eval_examples(tmp_path / "out" / "synth", settings)["closed"]
    prior = ablation.closed_blind_prior(tmp_path / "out" / "synth", closed)
    assert 0 < prior["overall"] < 1
    assert f"| Blind prior: closed overall | {100 * prior['overall']:.1f} ± 0.0 |" in text
    dependence = summary["attention"]["question_dependence"]
    assert f"| TG-IS question dependence (median over volumes) | {dependence:.3g} ± 0 |" in text
    # an evaluation cached before image reliance was measured gets it on the next run, nothing else is redone
    del summary["image_reliance"]
    (run / "eval.json").write_text(json.dumps(summary))
    predictions = (run / "predictions.jsonl").read_text()
    ablation.run_ablation(tmp_path / "out", settings, tmp_path / "results.md")
    again = json.loads((run / "eval.json").read_text())
    assert again["image_reliance"] == reliance and (run / "predictions.jsonl").read_text() == predictions
    assert reliance["accuracy"]["overall"] == summary["closed_vqa"]["overall"]  # the predictions' answers
    # with the predictions gone, the own-volume answers are generated again
    (run / "predictions.jsonl").unlink()
    del again["image_reliance"]
    (run / "eval.json").write_text(json.dumps(again))
    ablation.run_ablation(tmp_path / "out", settings, tmp_path / "results.md")
    assert json.loads((run / "eval.json").read_text())["image_reliance"]["n_closed"] == reliance["n_closed"]


def test_ablation_folder_gains_variants_with_their_starting_points(tmp_path, fake_runs, tiny_model_dir):
    """A later run may add a variant with its own starting point; a variant's start cannot change, and runs
    from starting points and from scratch never share a folder."""
    out, results = tmp_path / "out", tmp_path / "results.md"
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "slice_aggregation": "mean"}))
    ablation.run_ablation(out, small(starts={"tgis": str(tiny_model_dir)}), results)
    both = {"tgis": str(tiny_model_dir), "mean": str(other)}
    ablation.run_ablation(out, small(variants=("mean", "tgis"), starts=both), results)
    assert json.loads((out / ablation.SETTINGS_RECORD).read_text())["starts"] == both
    assert fake_runs == ["benchmark", "train tgis-0", "benchmark", "train mean-0", "train tgis-0"]
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    changed = re.escape(f"other starting points: tgis ({tiny_model_dir} -> {copy})")
    with pytest.raises(ConfigError, match=changed):
        ablation.run_ablation(out, small(starts={"tgis": str(copy)}), results)
    with pytest.raises(ConfigError, match="trained from starting points, this run has none"):
        ablation.run_ablation(out, small(), results)
    ablation.run_ablation(tmp_path / "scratch", small(), results)
    with pytest.raises(ConfigError, match="trained from none, this run has starting points"):
        ablation.run_ablation(tmp_path / "scratch", small(starts={"tgis": str(tiny_model_dir)}), results)
    shutil.rmtree(tmp_path / "scratch" / "runs")  # settings recorded, no run made: nothing to keep apart
    ablation.run_ablation(tmp_path / "scratch", small(starts={"tgis": str(copy)}), results)
    assert json.loads((tmp_path / "scratch" / ablation.SETTINGS_RECORD).read_text())["starts"] == {
        "tgis": str(copy)
    }


PROSE = f"# Notes\n\nThe table goes between `{ablation.BEGIN}` and `{ablation.END}`.\n\nMy paragraph.\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"{ablation.END}\n{ablation.BEGIN}\n", "expected one"),
        (f"{ablation.BEGIN}\nmy own table\n{ablation.END}\n", "were not written by med2e3 ablation"),
        (f"{ablation.BEGIN}\n{ablation.END}\n{ablation.BEGIN}\n{ablation.END}\n", "expected one"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "not a UTF-8 text"),
        (None, "not a file"),
    ],
)
def test_ablation_results_target_checked_before_any_work(tmp_path, fake_runs, content, problem):
    target = tmp_path / "target"
    if content is None:
        target.mkdir()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    with pytest.raises(OutputError, match=problem):
        ablation.run_ablation(tmp_path / "out", small(), target)
    assert fake_runs == [] and not (tmp_path / "out").exists()


def test_ablation_results_keep_prose_that_mentions_the_markers(tmp_path, fake_runs):
    target = tmp_path / "notes.md"
    target.write_text(PROSE)
    ablation.run_ablation(tmp_path / "out", small(), target)
    ablation.run_ablation(tmp_path / "out", small(), target)  # the second run replaces its own block
    text = target.read_text()
    assert text.startswith(PROSE) and text.count(ablation.SIGNATURE) == 1
    assert text.rstrip().endswith(ablation.END)


# ---- eval: --limit, and a predictions file that is never rewritten --------------------------------
def dataset_file(tmp_path: Path, n: int = 8) -> tuple[Path, list[Example]]:
    """A conversation JSONL of ``n`` open questions (empty volume files: nothing loads them)."""
    examples = []
    for i in range(n):
        volume = tmp_path / f"v{i}.nii.gz"
        volume.write_bytes(b"")
        examples.append(
            Example(
                id=f"q{i}",
                volume=volume,
                task="vqa_open",
                question="Which side?",
                prompt="Which side?",
                answer="left",
            )
        )
    path = tmp_path / "dataset.jsonl"
    write_conversations(examples, path)
    return path, examples


def predictions(path: Path, examples: list[Example]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": e.id, "volume": str(e.volume), "answer": "left"}) + "\n" for e in examples)
    )
    return path


def test_eval_limit_is_positive_and_named_as_the_reason(tmp_path, capsys):
    data, examples = dataset_file(tmp_path)
    preds = predictions(tmp_path / "p.jsonl", examples)
    assert "--limit must be at least 1" in cli_error(
        capsys, "eval", str(preds), "--dataset", str(data), "--limit", "-446"
    )
    err = cli_error(capsys, "eval", str(preds), "--dataset", str(data), "--limit", "4")
    assert "4 prediction id(s) are in the dataset but beyond the first 4 examples (--limit)" in err
    assert "not in the dataset" not in err
    with (tmp_path / "p.jsonl").open("a") as f:
        f.write(json.dumps({"id": "elsewhere", "answer": "x"}) + "\n")
    err = cli_error(capsys, "eval", str(preds), "--dataset", str(data), "--limit", "4")
    assert "1 prediction id(s) are not in the dataset: 'elsewhere'" in err
    assert main(["eval", str(predictions(preds, examples[:4])), "--dataset", str(data), "--limit", "4"]) == 0


def test_eval_model_never_rewrites_the_users_predictions(tmp_path, tiny_model_dir, capsys):
    data, examples = dataset_file(tmp_path)
    preds = predictions(tmp_path / "p.jsonl", examples)
    lines = preds.read_text().splitlines(keepends=True)
    lines[3] = '{"id": "q3", "answer": \n'
    preds.write_text("".join(lines))
    before = preds.read_bytes()
    err = cli_error(capsys, "eval", str(preds), "--dataset", str(data), "--model", str(tiny_model_dir))
    assert f"{preds} (row 4)" in err
    assert preds.read_bytes() == before
