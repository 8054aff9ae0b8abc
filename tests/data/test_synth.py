"""Tests of the synthetic CT benchmark generator (small shapes, tiny benchmarks)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from med2e3.data.synth import (
    ORGANS,
    PHASES,
    PLANES,
    STRUCTURE_ID,
    VQA_HEADER,
    SynthConfig,
    case_rng,
    generate_benchmark,
    generate_volume,
    model_slices,
    synthesize,
)
from med2e3.errors import ConfigError

SMALL = SynthConfig(shape=(24, 48, 48))  # K = 24 stored slices -> 32 model slices: a non-trivial mapping
REGION_ORGANS = {
    "chest": {"right lung", "left lung", "heart"},
    "abdomen": {"liver", "spleen", "right kidney", "left kidney"},
    "pelvis": {"urinary bladder"},
}
N_BENCH = 8


def _expected_organs(region: str) -> set[str]:
    return set().union(*(REGION_ORGANS[r] for r in region.split("-")))


def _cases(n: int, cfg: SynthConfig = SMALL, seed: int = 0):
    return [synthesize(case_rng(seed, i), cfg) for i in range(n)]


def test_model_slices_mapping():
    assert model_slices([0], 48) == [0]
    assert model_slices([1], 48) == [0, 1]  # stored [1, 2) overlaps model [0, 1.5) and [1.5, 3)
    assert model_slices([47], 48) == [31]
    assert model_slices(range(32), 32) == list(range(32))
    assert model_slices([3], 16) == [6, 7]
    assert model_slices([], 24) == []


def test_config_validation():
    with pytest.raises(ConfigError, match="shape"):
        SynthConfig(shape=(8, 48, 48))
    with pytest.raises(ConfigError, match="plane_probs"):
        SynthConfig(plane_probs={"oblique": 1.0})
    with pytest.raises(ConfigError, match="noise_hu"):
        SynthConfig(noise_hu=(20.0, 10.0))


def test_generate_volume_is_deterministic():
    v1, a1, l1 = generate_volume(case_rng(7, 3), SMALL)
    v2, a2, l2 = generate_volume(case_rng(7, 3), SMALL)
    assert v1.dtype == np.int16 and v1.shape == (48, 48, 24)  # stored (W, H, D)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(a1, a2)
    assert json.dumps(l1) == json.dumps(l2)
    v3, _, _ = generate_volume(case_rng(8, 3), SMALL)
    v4, _, _ = generate_volume(case_rng(7, 4), SMALL)
    assert not np.array_equal(v1, v3) and not np.array_equal(v1, v4)


@pytest.mark.parametrize("plane", PLANES)
def test_affine_is_honest(plane):
    cfg = SynthConfig(shape=(24, 48, 48), plane_probs={plane: 1.0})
    case = synthesize(case_rng(1, 0), cfg)
    codes = nib.aff2axcodes(case.affine)
    assert codes == {"axial": ("L", "P", "S"), "coronal": ("L", "I", "P"), "sagittal": ("P", "I", "L")}[plane]
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, case.labels["spacing"], atol=1e-3)
    # each lesion's labelled centre (mm) is its voxel centre through the affine
    for les in case.labels["lesions"]:
        mm = case.affine @ np.array([*les["center_voxel"], 1.0])
        np.testing.assert_allclose(mm[:3], les["center_mm"], atol=0.01)
    # the body spans the full depth: foreground cropping keeps every stored slice
    assert (case.volume > -500).any(axis=(0, 1)).all()


def test_labels_agree_with_volume():
    cases = _cases(24) + _cases(6, SynthConfig(shape=(24, 48, 48), plane_probs={"coronal": 1, "sagittal": 1}))
    n_lesions = 0
    for case in cases:
        lab, depth = case.labels, case.volume.shape[2]
        present = {o for o in ORGANS if o in lab["organs"]}
        assert present == _expected_organs(lab["region"])  # organs outside the region are absent
        for name, info in lab["organs"].items():
            mask = case.organ_map == STRUCTURE_ID[name]
            ks = np.nonzero(mask.any(axis=(0, 1)))[0]
            assert info["voxels"] == mask.sum()
            assert info["stored_slices"] == [ks.min(), ks.max()]
            assert info["model_slices"] == model_slices(ks, depth)
        types = [les["type"] for les in lab["lesions"]]
        assert len(set(types)) == len(types) and len({les["organ"] for les in lab["lesions"]}) == len(types)
        for i, les in enumerate(lab["lesions"], start=1):
            n_lesions += 1
            mask = case.lesion_map == i
            assert mask.sum() == les["voxels"] > 0
            assert (case.organ_map[mask] == STRUCTURE_ID[les["organ"]]).all()  # inside the named organ
            assert mask[tuple(les["center_voxel"])]
            ks = np.nonzero(mask.any(axis=(0, 1)))[0]
            assert les["model_slices"] == model_slices(ks, depth)
            assert 1 <= len(les["model_slices"]) <= 4
            assert set(les["model_slices"]) <= set(lab["organs"][les["organ"]]["model_slices"])
            # the lesion is visible as an intensity difference of the documented sign
            values = case.volume[mask].astype(float)
            tol = 4 * lab["noise_hu"] / np.sqrt(values.size) + 1
            assert abs(values.mean() - les["hu"]) < tol
            if les["type"] == "calcification":
                assert les["hu"] >= 800
            elif les["type"] == "cyst":
                assert les["hu"] <= 15
            else:
                organ = case.volume[(case.organ_map == STRUCTURE_ID[les["organ"]]) & (case.lesion_map == 0)]
                assert les["hu"] > np.median(organ) + 20
    assert n_lesions >= 20


def test_phase_sets_aorta_intensity():
    medians = {}
    for phase in PHASES:
        cfg = SynthConfig(shape=(24, 48, 48), phase_probs={phase: 1.0}, region_probs={"chest-abdomen": 1.0})
        case = synthesize(case_rng(5, 0), cfg)
        assert case.labels["phase"] == phase
        medians[phase] = np.median(case.volume[case.organ_map == STRUCTURE_ID["aorta"]])
    assert medians["non-contrast"] < 80
    assert 120 < medians["portal venous"] < 210
    assert medians["arterial"] > 280


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench1")
    summary = generate_benchmark(out, N_BENCH, seed=3, cfg=SMALL, workers=1, progress=False)
    return out, summary


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row, strict=True)) for row in reader]


def test_benchmark_csvs(bench):
    out, summary = bench
    types = set()
    n_rows = 0
    for split in ("train", "validation", "test"):
        header, rows = _read_csv(out / f"M3D_VQA_{split}.csv")
        assert tuple(header) == VQA_HEADER
        assert len(rows) == summary["questions"][split]
        for row in rows:
            n_rows += 1
            choices = [row[f"Choice {c}"] for c in "ABCD"]
            assert len(set(choices)) == 4
            assert row["Answer"] in choices
            assert row["Answer Choice"] == "ABCD"[choices.index(row["Answer"])]
            qtype = int(row["Question Type"])
            assert 1 <= qtype <= 5
            types.add(qtype)
            slices = [int(s) for s in row["Relevant Slices"].split()]
            assert slices and slices == sorted(set(slices)) and 0 <= slices[0] and slices[-1] < 32
            assert (out / row["Image Path"]).is_file() and row["Image Path"].startswith(f"volumes/{split}/")
            if qtype == 1:
                assert slices == list(range(32))
    assert types == {1, 2, 3, 4, 5}
    assert n_rows >= 10 * N_BENCH


def test_benchmark_json_labels_and_nifti(bench):
    out, summary = bench
    cap = json.loads((out / "M3D_Cap.json").read_text())
    assert set(cap) == {"train", "validation", "test"}
    assert sum(len(v) for v in cap.values()) == N_BENCH
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [lab["index"] for lab in labels] == list(range(N_BENCH))
    by_image = {lab["image"]: lab for lab in labels}
    for split, entries in cap.items():
        for entry in entries:
            assert (out / entry["image"]).is_file() and (out / entry["text"]).is_file()
            assert (out / entry["text"]).read_text().strip()
            lab = by_image[entry["image"]]
            assert lab["split"] == split
            img = nib.load(out / entry["image"])
            assert img.get_data_dtype() == np.int16
            assert img.shape == tuple(lab["shape"])
            np.testing.assert_allclose(img.affine, lab["affine"], atol=1e-3)
            np.testing.assert_allclose(img.header.get_zooms(), lab["spacing"], atol=1e-3)
            # the file holds exactly what generate_volume draws for this index
            volume, _, _ = generate_volume(case_rng(3, lab["index"]), SMALL)
            np.testing.assert_array_equal(np.asanyarray(img.dataobj), volume)
    readme = (out / "README.md").read_text()
    assert "seed: 3" in readme and 'orientation="acquisition"' in readme
    assert summary["generated"] == N_BENCH and summary["skipped"] == 0


def test_workers_do_not_change_results_and_resume(bench, tmp_path):
    out1, _ = bench
    out2 = tmp_path / "bench2"
    generate_benchmark(out2, N_BENCH, seed=3, cfg=SMALL, workers=2, progress=False)
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2
    for rel in files1:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel

    # resume: delete one volume (and leave a stale temporary file); only that one is regenerated
    volumes = sorted((out2 / "volumes").rglob("*.nii.gz"))
    victim = volumes[2]
    before = {p: p.stat().st_mtime_ns for p in volumes if p != victim}
    original = victim.read_bytes()
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp999").write_bytes(b"partial")
    summary = generate_benchmark(out2, N_BENCH, seed=3, cfg=SMALL, workers=2, progress=False)
    assert summary["generated"] == 1 and summary["skipped"] == N_BENCH - 1
    assert victim.read_bytes() == original
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not list(out2.rglob("*.tmp*"))

    # other arguments (a different config) invalidate the finished volumes
    other = SynthConfig(shape=(24, 48, 48), noise_hu=(5.0, 6.0))
    summary = generate_benchmark(out2, N_BENCH, seed=3, cfg=other, workers=1, progress=False)
    assert summary["generated"] == N_BENCH
    shutil.rmtree(out2 / "captions")  # an incomplete volume (caption missing) is regenerated too
    summary = generate_benchmark(out2, N_BENCH, seed=3, cfg=other, workers=1, progress=False)
    assert summary["generated"] == N_BENCH
