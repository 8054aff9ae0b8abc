"""Smoke test of benchmarks/: each entry point runs at the smallest sizes, prints JSON records with the
expected keys, and the optimised and naive paths agree (greedy tokens, TG-IS scores). No timing asserts."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STATS = {"median_ms", "min_ms", "max_ms", "repeats"}
DRY_RUN = ["--device", "cpu", "--preset", "tiny", "--quick", "--threads", "1"]


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delenv("OUT", raising=False)  # records go to stdout only
    threads = torch.get_num_threads()
    from benchmarks import gpu_paper, inference, training

    yield inference, training, gpu_paper
    torch.set_num_threads(threads)
    signal.alarm(0)


def records(capsys) -> dict[str, list[dict]]:
    """The printed JSON lines, grouped by record name (every stdout line must be JSON)."""
    by_name: dict[str, list[dict]] = {}
    for line in capsys.readouterr().out.splitlines():
        record = json.loads(line)
        by_name.setdefault(record["name"], []).append(record)
    return by_name


def check_comparison(record: dict) -> None:
    assert STATS <= record["naive"].keys() and STATS <= record["optimised"].keys()
    assert "speedup" in record


def test_inference_benchmark_paths_agree(bench_modules, capsys):
    inference = bench_modules[0]
    inference.main(["--quick", "--threads", "1"])
    out = records(capsys)
    assert out["machine"][0]["preset"] == "tiny"
    assert {r["section"] for r in out["section_done"]} == set(inference.SECTIONS)

    eq = out["equivalence"][0]
    assert eq["tokens_equal"] is True and eq["max_score_abs_diff"] < 1e-5
    for record in out["questions"]:
        check_comparison(record)
        assert STATS <= record["cached"].keys()
        assert record["answers_equal"] is True and record["max_score_abs_diff"] < 1e-5
    assert [r["n_questions"] for r in out["questions"]] == [1, 2]
    for record in out["batch_answer"] + out["batch_encode"] + out["encode2d"] + out["prefill"]:
        check_comparison(record)
    assert all(r["answers_equal"] for r in out["batch_answer"])
    assert out["encode2d"][0]["max_abs_diff"] < 1e-4
    assert out["prefill"][0]["logits_max_abs_diff"] < 1e-4
    assert out["preprocess"][0]["outputs_equal"] is True
    check_comparison(out["batch_mode"][0])
    assert out["batch_mode"][0]["answers_equal"] is True

    decode = out["decode"][0]
    assert decode["tokens_equal"] is True
    assert set(decode["variants"]) == {"dynamic", "static"}
    assert STATS <= decode["variants"]["static"]["ms_per_token"].keys()
    assert [r["depth"] for r in out["depth"]] == [32, 64]
    assert out["depth"][1]["image_tokens"] > out["depth"][0]["image_tokens"]
    assert {"encode", "tgis", "prefill", "answer"} <= out["depth"][0].keys()


def test_training_benchmark_steps(bench_modules, capsys):
    training = bench_modules[1]
    training.main(["--quick", "--threads", "1"])
    out = records(capsys)
    steps = out["train_step"]
    assert {(r["stage"], r["variant"]) for r in steps} == {
        (stage, variant) for stage in ("pretrain", "finetune") for variant in training.VARIANTS
    }
    for record in steps:
        assert STATS <= record["step"].keys()
        assert record["samples_per_s"] > 0 and record["peak_memory_mb"] > 0
        assert math.isfinite(record["loss"]) and record["trainable_reached"] == 1.0
    assert {r["stage"] for r in out["train_compare"]} == {"pretrain", "finetune"}


def test_gpu_script_dry_run_on_cpu(bench_modules, capsys):
    gpu_paper = bench_modules[2]
    gpu_paper.main([*DRY_RUN, "--only", "encoders,prefill,pretrain"])
    out = records(capsys)
    assert out["machine"][0]["preset"] == "tiny" and out["machine"][0]["parameters"] > 0
    assert {"encode2d", "encode_plus_prefill", "train_step", "done"} <= out.keys()
    assert "flops" in out["encode_plus_prefill"][0] and "achieved_tflops" in out["train_step"][0]
    gpu_paper.main([*DRY_RUN, "--only", "questions", "--time-limit", "5"])
    assert "skipped" in records(capsys)["questions"][0]


def test_server_batch_benchmark_compares_the_servers(bench_modules, capsys):
    """Two server processes, smallest load: both answer everything, and their answers agree."""
    from benchmarks import server_batch

    server_batch.main(
        [
            "--clients",
            "1,3",
            "--questions",
            "3",
            "--volumes",
            "2",
            "--max-new-tokens",
            "2",
            "--max-batch",
            "4",
        ]
    )
    out = records(capsys)
    agreement = out["agreement"][0]
    assert agreement["answers_equal"] is True and agreement["max_score_abs_diff"] < 1e-5
    loads = {(r["max_batch"], r["clients"]): r for r in out["load"]}
    assert set(loads) == {(size, clients) for size in (1, 4) for clients in (1, 3)}
    for record in loads.values():
        assert record["status"] == {"200": 3} and record["problems"] == []
        assert record["questions_per_s"] > 0 and record["latency_p50_s"] <= record["latency_p95_s"]
    assert [r["clients"] for r in out["compare"]] == [1, 3]


def test_gpu_script_first_token_and_decode_sections_on_cpu(bench_modules, capsys):
    """The issue-16 sections run, compare the default and compile=True predictors, and agree (fp32, CPU)."""
    gpu_paper = bench_modules[2]
    gpu_paper.main([*DRY_RUN, "--only", "ttft,decode_batch1", "--bandwidth-tbs", "1"])
    out = records(capsys)
    ttft = out["ttft"][0]
    assert STATS <= ttft["default"].keys() and STATS <= ttft["compiled"].keys()
    assert {"encode", "tgis"} <= ttft["parts"]["compiled"].keys()
    assert ttft["same_first_token"] is True and ttft["max_score_abs_diff"] == 0.0
    assert ttft["graphs"] is None and ttft["target_ms"] is None  # CPU: no graphs, no target
    decode = out["decode_batch1"][0]
    assert set(decode["variants"]) == {"dynamic", "predictor"} and decode["tokens_equal"] is True
    assert math.isclose(decode["target_ms_per_token"], 2 * decode["bound_ms_per_token"], abs_tol=1e-3)
    assert set(decode["target_met"]) == {"dynamic", "predictor"}


def test_demo_seeds_table_lists_each_seed_and_the_mean():
    from benchmarks.demo_seeds import TYPES, table

    def summary(own: float, swapped: float) -> dict:
        per_type = {t: own for t in TYPES if t != "overall"}
        tgis = {
            "question_dependence": 1e-4,
            "relevant_mass": dict.fromkeys(TYPES, 0.5),
            "uniform_mass": dict.fromkeys(TYPES, 0.4),
        }
        return {
            "closed_vqa_accuracy": {
                "overall": own,
                "per_type": per_type,
                "text_accuracy": per_type,
                "blind_prior": dict.fromkeys(TYPES, 0.3),
                "tgis": tgis,
            },
            "image_reliance": {
                "accuracy_swapped": dict.fromkeys(TYPES, swapped),
                "loss": 0.3,
                "loss_swapped": 0.5,
            },
            "wall_seconds": 600.0,
        }

    text = table({0: summary(0.5, 0.25), 1: summary(0.7, 0.35)})
    assert (
        "| letter accuracy: overall | 50.0 / 70.0 (mean 60.0 ± 14.1) | 25.0 / 35.0 (mean 30.0 ± 7.1) |"
        in text
    )
    assert "40.0" in text and "seeds 0, 1" in text
    assert "starting point" not in text
    tuned = {seed: {**summary(own, 0.3), "start": summary(0.4, 0.3)} for seed, own in ((0, 0.5), (1, 0.7))}
    text = table(tuned)
    assert (
        "| letter accuracy: overall | 40.0 / 40.0 (mean 40.0 ± 0.0) | 50.0 / 70.0 (mean 60.0 ± 14.1) |"
        in text
    )
    assert "| mean answer loss per token | 0.300 / 0.300 (mean 0.300 ± 0.000) | 0.300" in text


def test_lesion_ceiling_label_maps_align_with_the_model_input(bench_modules, capsys, tmp_path):
    """The benchmark reads a volume as `load_volume` reads its file, its label maps (cropped and resized
    like the image) put each lesion on voxels that differ from the organ the way its type does, and the
    table has every setting with its majority rate."""
    from benchmarks import lesion_ceiling

    from med2e3.data.io import load_volume
    from med2e3.data.synth import STRUCTURE_ID, SynthConfig, generate_benchmark

    seed, volumes, size = 5000, 12, (32, 64, 64)
    generate_benchmark(tmp_path, volumes, seed, workers=1, progress=False)
    planes, signs = set(), {"cyst": [], "mass": [], "calcification": []}
    for index in range(volumes):
        volume, organs, lesions, labels = lesion_ceiling.read_case(seed, index, SynthConfig())
        (path,) = tmp_path.glob(f"volumes/*/synth_{index:05d}.nii.gz")
        stored = load_volume(path, orientation="acquisition")
        assert np.array_equal(stored.array, volume.array) and np.allclose(stored.affine, volume.affine)
        planes.add(labels["plane"])
        view = lesion_ceiling.model_view(volume, organs, lesions, size)
        assert view.image.shape == view.organs.shape == view.lesions.shape == size
        for number, lesion in enumerate(labels["lesions"], 1):
            spot = view.lesions == number
            tissue = (view.organs == STRUCTURE_ID[lesion["organ"]]) & ~spot
            if spot.any():  # a small calcification can fall between the resized grid's samples
                signs[lesion["type"]].append(np.sign(view.image[spot].mean() - np.median(view.image[tissue])))
    assert planes == {"axial", "coronal", "sagittal"}
    assert all(len(found) >= 2 for found in signs.values())
    assert set(signs["cyst"]) == {-1} and set(signs["mass"] + signs["calcification"]) == {1}

    lesion_ceiling.main(["--volumes", str(volumes), "--seed", str(seed), "--native"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "majority rate, %" in rows[0]
    settings = [row[0].removeprefix("| ") for row in rows[1:]]
    assert settings == [f"{res}: {s}" for res in ("model", "native") for s in lesion_ceiling.SETTINGS]
    for row in rows[1:]:
        assert row[1] == rows[1][1]  # the same (volume, organ) pairs in every setting
        assert 0 <= float(row[2]) <= 100 and 50 <= float(row[3]) <= 100  # "none" is the majority


def test_dense_lesion_targets_mark_each_lesion_in_its_host_and_training_reports_scores(bench_modules, capsys):
    from benchmarks import dense_lesions, lesion_ceiling

    from med2e3.data.synth import STRUCTURE_ID, SynthConfig

    seed, lesions_seen = 5, 0
    for index in range(4):
        volume, organs, lesions, case = lesion_ceiling.read_case(seed, index, SynthConfig())
        view = lesion_ceiling.model_view(volume, organs, lesions, (32, 64, 64))
        labels = dense_lesions.token_labels(view.organs, view.lesions, case["lesions"], patch=16)
        assert labels.shape == (32, 16, len(dense_lesions.HOSTS))
        for k, host in enumerate(dense_lesions.HOSTS):  # a patch holds the host exactly where its voxels are
            present = view.organs.reshape(32, 4, 16, 4, 16).transpose(0, 1, 3, 2, 4) == STRUCTURE_ID[host]
            assert ((labels[:, :, k] > 0) == present.reshape(32, 16, -1).any(-1)).all()
        for n, lesion in enumerate(case["lesions"], start=1):
            column = labels[:, :, dense_lesions.HOSTS.index(lesion["organ"])]
            kind = dense_lesions.CLASSES.index(lesion["type"])
            in_view = (view.lesions == n).any()
            assert (column == kind).any() == in_view  # the lesion's class, in its host, where it is seen
            assert not np.isin(column, [c for c in (2, 3, 4) if c != kind]).any()
            lesions_seen += int(in_view)
    assert lesions_seen > 0
    argv = ["--train-volumes", "3", "--test-volumes", "2", "--train-seed", "5", "--test-seed", "6"]
    dense_lesions.main([*argv, "--epochs", "1", "--width", "16", "--layers", "1", "--batch-size", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["settings"]["epochs"] == 1 and lines[1]["epoch"] == 1
    test = lines[1]["test"]
    assert set(test["token_recall"]) == set(dense_lesions.CLASSES) and test["pairs"] > 0
    assert all(0 <= v <= 1 for v in test["volume_accuracy"].values()) and 0 < test["majority"] <= 1


def test_lesion_probe_reads_a_saved_dense_encoder_one_row_per_organ_present(bench_modules, capsys, tmp_path):
    from benchmarks import dense_lesions, lesion_probe

    saved = tmp_path / "encoder.safetensors"
    argv = ["--train-volumes", "3", "--test-volumes", "2", "--train-seed", "5", "--test-seed", "6"]
    dense_lesions.main([*argv, "--epochs", "1", "--batch-size", "2", "--save", str(saved)])
    data = dense_lesions.build(6, 2, 64, 16, progress=False)
    features, answers = lesion_probe.pooled(data, *lesion_probe.encoder(str(saved)))
    present = (data.labels > 0).flatten(1, 2).any(1)  # volumes x hosts
    truth = (data.labels.long().flatten(1, 2).amax(1) - 1).clamp(min=0)[present]
    assert features.shape == (int(present.sum()), 3 * 16 * 64 + len(dense_lesions.HOSTS))
    assert answers.tolist() == truth.tolist() and (features[:, -len(dense_lesions.HOSTS) :].sum(1) == 1).all()
    capsys.readouterr()
    lesion_probe.main(["--encoder", str(saved), "--train-volumes", "3", "--test-volumes", "2"] + argv[4:])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["encoder"] == str(saved) and record["pairs"][1] == len(answers)
    assert 0 < record["majority"] <= 1 and 0 <= record["accuracy (l2 0.1)"] <= 1


def test_starting_point_script_refuses_an_unknown_variant_before_any_work(tmp_path):
    import subprocess

    work = tmp_path / "work"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_tiny_model.sh"), str(work), "3d-only"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2 and "unknown variant '3d-only' (tgis, mean, none)" in done.stderr
    assert not work.exists()


def test_slice_weights_benchmark_forces_each_weighting_and_tabulates_it(
    bench_modules, capsys, tmp_path, tiny_model_dir
):
    """Inside `forced_weights` the model aggregates with the given weights (and reports them as its scores);
    the oracle is uniform over the relevant slices; the run answers every question once per weighting and model."""
    import shutil

    from benchmarks import slice_weights

    from med2e3.data.synth import benchmark_examples, generate_benchmark
    from med2e3.inference import Med2E3Predictor

    out = tmp_path / "ablation"
    generate_benchmark(out / "synth", 12, seed=0, workers=1, progress=False)
    shutil.copytree(tiny_model_dir, out / "runs" / "tgis-seed0" / "finetune")
    (out / "runs" / "none-seed0" / "finetune").mkdir(parents=True)  # no 2D branch: not asked
    closed = [e for e in benchmark_examples(out / "synth", "vqa", "test") if e.task == "vqa_closed"]
    local = next(e for e in closed if e.relevant_slices and len(set(e.relevant_slices)) < 32)
    oracle = slice_weights.mode_weights("oracle", local, 32)
    assert oracle[0, sorted(set(local.relevant_slices))].sum() == pytest.approx(1.0)
    assert (oracle > 0).sum() == len(set(local.relevant_slices))

    predictor = Med2E3Predictor.from_pretrained(tiny_model_dir, device="cpu")
    predictor.orientation = local.orientation
    predictor.load(local.volume)
    own = predictor.ask(local.question, local.prompt, max_new_tokens=2).slice_scores
    with slice_weights.forced_weights(predictor.model, lambda: oracle):
        forced = predictor.ask(local.question, local.prompt, max_new_tokens=2).slice_scores
    assert torch.allclose(torch.tensor(forced), oracle[0])
    assert predictor.ask(local.question, local.prompt, max_new_tokens=2).slice_scores == own

    slice_weights.main([str(out), "--questions", "6", "--max-new-tokens", "2"])
    lines = capsys.readouterr().out.splitlines()
    record = json.loads(lines[0])
    assert (record["variant"], record["seed"], record["questions"]) == ("tgis", 0, 6)
    assert set(slice_weights.MODES) <= set(record) and 0 <= record["oracle"]["overall"] <= 1
    assert slice_weights.mode_weights("zero", local, 32).abs().sum() == 0
    assert "| overall, oracle weights | " in "\n".join(lines[1:])
