"""Synthetic CT benchmark: labelled CT-like volumes whose questions have exact answers.

The generator mirrors M3D-Data (M3D-Cap captions + M3D-VQA five-type questions) on synthetic
volumes built from a small parametric anatomy (body, lungs, heart, liver, spleen, kidneys, bladder,
spine, aorta, iliac arteries) with a random scanned region, contrast phase, acquisition plane and
0-3 small lesions. Every question carries the model slices (of ``n_model_slices`` = 32) that hold
the structure it asks about, so slice attention (TG-IS) can be scored. See ``docs/data.md``.

The package has three modules, one idea each:

- `anatomy`: `SynthConfig`, the parametric anatomy (body, organs, vessels, spine, lesions) and its
  rendering into one volume with label maps and ground truth (`synthesize`, `generate_volume`);
  its docstring states the geometry (labels refer to the stored slice axis, so a benchmark is read
  with ``orientation="acquisition"``);
- `text`: the questions and the caption of one volume, drawn from its labels;
- `benchmark`: writing a benchmark (files, resumable generation in worker processes, index and
  README; `generate_benchmark`) and reading its files back (`benchmark_source`, `benchmark_examples`).

Names with a leading underscore are shared between these modules, not part of the API.

Volume ``index`` of a benchmark made with ``seed`` is ``generate_volume(case_rng(seed, index), cfg)``.
"""

from med2e3.data.synth.anatomy import (
    LESION_HOSTS,
    LESION_TYPES,
    ORGANS,
    PHASES,
    PLANES,
    REGIONS,
    STRUCTURE_ID,
    STRUCTURES,
    SynthCase,
    SynthConfig,
    case_rng,
    generate_volume,
    model_slices,
    synthesize,
)
from med2e3.data.synth.benchmark import (
    CAPTIONS_FILE,
    GENERATOR_VERSION,
    SPLITS,
    VQA_FILE,
    VQA_HEADER,
    benchmark_examples,
    benchmark_source,
    generate_benchmark,
)

__all__ = [
    "SynthConfig",
    "SynthCase",
    "synthesize",
    "generate_volume",
    "generate_benchmark",
    "benchmark_source",
    "benchmark_examples",
    "case_rng",
    "model_slices",
    "PLANES",
    "PHASES",
    "REGIONS",
    "LESION_TYPES",
    "LESION_HOSTS",
    "ORGANS",
    "STRUCTURES",
    "STRUCTURE_ID",
    "SPLITS",
    "VQA_HEADER",
    "CAPTIONS_FILE",
    "VQA_FILE",
    "GENERATOR_VERSION",
]
