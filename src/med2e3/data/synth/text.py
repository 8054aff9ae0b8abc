"""Question and caption text: M3D-VQA questions and an M3D-Cap findings report for one volume.

Both are drawn from a volume's labels (see `med2e3.data.synth.anatomy.synthesize`) with the
volume's text generator (`_text_rng`), so every answer is exact. Every question carries the model
slices (of ``n_model_slices``) that hold the structure it asks about, so slice attention (TG-IS)
can be scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from med2e3.data.synth.anatomy import _PARTS, LESION_HOSTS, ORGANS, _location


def _text_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws the questions and caption of volume ``index`` (its anatomy: `case_rng`)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1)))


# ---------------------------------------------------------------------------------------------
# Questions (M3D-VQA style) and captions (M3D-Cap style)

_PLANE_ANSWER = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_PHASE_ANSWER = {
    "non-contrast": "Non-contrast",
    "arterial": "Arterial phase",
    "portal venous": "Portal venous phase",
}
_ABNORMALITY_ANSWER = {
    "cyst": "Cyst",
    "mass": "Solid mass",
    "calcification": "Calcification",
    None: "No abnormality",
}
_LESION_WORD = {"cyst": "cyst", "mass": "solid mass", "calcification": "calcification"}
_NO_LESION = "No focal lesion is seen"

_Q_PLANE = (
    "In which plane is this CT image acquired?",
    "Which imaging plane is shown in this scan?",
    "What is the acquisition plane of these CT slices?",
    "In what plane are the slices of this CT displayed?",
)
_Q_PHASE = (
    "What is the contrast phase of this CT scan?",
    "In which phase was this CT acquired?",
    "Which enhancement phase does this CT show?",
    "What phase of contrast enhancement is this scan?",
)
_Q_PRESENT = (
    "Which of the following organs is visible in this scan?",
    "Which organ can be seen in this image?",
    "Which of these organs is included in the scanned field?",
)
_Q_ABSENT = (
    "Which of the following organs is not included in this scan?",
    "Which organ lies outside the scanned field?",
    "Which of these organs cannot be seen in this image?",
)
_Q_HOST = ("Which organ contains the {w}?", "In which organ is the {w} found?", "Which organ shows the {w}?")
_Q_ABNORMAL = (
    "What abnormality is seen in the {o}?",
    "What type of lesion is present in the {o}?",
    "Which finding best describes the {o}?",
    "What is the abnormality of the {o}?",
)
_Q_WHERE = ("Where is the {w} located?", "Where is the {w} seen?", "What is the location of the {w}?")


def _choices(rng: np.random.Generator, answer: str, distractors: Sequence[str]) -> tuple[list[str], str]:
    """Four shuffled choices (the answer + the first three distinct distractors) and the answer's letter."""
    pool = [answer] + list(dict.fromkeys(d for d in distractors if d != answer))[:3]
    if len(pool) < 4:
        raise ValueError(f"need three distractors for {answer!r}, got {pool[1:]}")
    order = rng.permutation(4)
    choices = [pool[i] for i in order]
    return choices, "ABCD"[choices.index(answer)]


def _pick(rng: np.random.Generator, items: Sequence[Any], k: int | None = None) -> Any:
    if k is None:
        return items[int(rng.integers(len(items)))]
    return [items[i] for i in rng.permutation(len(items))[:k]]


def _cap(name: str) -> str:
    return name[0].upper() + name[1:]


def _questions(rng: np.random.Generator, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """M3D-VQA questions for one volume: dicts with keys type, question, choices, answer, letter, slices."""
    n_ms = labels["n_model_slices"]
    every = list(range(n_ms))
    organs = labels["organs"]
    present = [o for o in ORGANS if o in organs]
    absent = [o for o in ORGANS if o not in organs]
    lesions = labels["lesions"]
    by_organ = {les["organ"]: les for les in lesions}
    out: list[dict[str, Any]] = []

    def add(qtype: int, question: str, answer: str, distractors: Sequence[str], slices: list[int]) -> None:
        choices, letter = _choices(rng, answer, distractors)
        out.append(
            {
                "type": qtype,
                "question": question,
                "choices": choices,
                "answer": answer,
                "letter": letter,
                "slices": slices,
            }
        )

    for q in _pick(rng, _Q_PLANE, 2):  # 1 Plane: the whole volume
        add(
            1,
            q,
            _PLANE_ANSWER[labels["plane"]],
            _pick(rng, ["Axial", "Coronal", "Sagittal", "Oblique"], 4),
            every,
        )
    for q in _pick(rng, _Q_PHASE, 2):  # 2 Phase: the slices holding the aorta / iliac arteries
        add(
            2,
            q,
            _PHASE_ANSWER[labels["phase"]],
            _pick(rng, [*_PHASE_ANSWER.values(), "Delayed phase"], 4),
            labels["artery_model_slices"],
        )

    organ_qs: list[tuple[str, str, list[str], list[int]]] = []  # 3 Organ
    if present and len(absent) >= 3:
        for o in _pick(rng, present, 2):
            organ_qs.append(
                (
                    _pick(rng, _Q_PRESENT),
                    _cap(o),
                    [_cap(a) for a in _pick(rng, absent, 3)],
                    organs[o]["model_slices"],
                )
            )
    if absent and len(present) >= 3:
        organ_qs.append(
            (
                _pick(rng, _Q_ABSENT),
                _cap(_pick(rng, absent)),
                [_cap(p) for p in _pick(rng, present, 3)],
                every,
            )
        )
    for les in lesions:
        others = [x["organ"] for x in lesions if x is not les]
        pool = others + _pick(rng, [o for o in present if o != les["organ"]], 8) + _pick(rng, list(ORGANS), 8)
        organ_qs.append(
            (
                _pick(rng, _Q_HOST).format(w=_LESION_WORD[les["type"]]),
                _cap(les["organ"]),
                [_cap(o) for o in pool if o != les["organ"]],
                les["model_slices"],
            )
        )
    for i in rng.permutation(len(organ_qs))[:3]:
        add(3, organ_qs[i][0], organ_qs[i][1], organ_qs[i][2], organ_qs[i][3])

    asked = [les["organ"] for les in lesions]  # 4 Abnormality: lesion organs, then normal hosts
    normal = [o for o in present if o in LESION_HOSTS and o not in by_organ]
    asked += _pick(rng, normal, max(0, 3 - len(asked)))
    for o in asked:
        les = by_organ.get(o)
        answer = _ABNORMALITY_ANSWER[les["type"] if les else None]
        add(
            4,
            _pick(rng, _Q_ABNORMAL).format(o=o),
            answer,
            _pick(rng, list(_ABNORMALITY_ANSWER.values()), 4),
            les["model_slices"] if les else organs[o]["model_slices"],
        )

    decoys = [_location(p, o) for o in present if o in LESION_HOSTS for p in _PARTS]  # 5 Location
    for les in lesions:
        same_organ = [_location(p, les["organ"]) for p in _PARTS]
        pool = [x["location"] for x in lesions] + _pick(rng, same_organ, 3) + _pick(rng, decoys, len(decoys))
        pool += _pick(rng, [_location(p, o) for o in LESION_HOSTS for p in _PARTS], 30)
        add(
            5,
            _pick(rng, _Q_WHERE).format(w=_LESION_WORD[les["type"]]),
            les["location"],
            pool,
            les["model_slices"],
        )
    if len(lesions) == 1:
        les = lesions[0]
        pool = _pick(rng, [_location(p, les["organ"]) for p in _PARTS], 3) + [_NO_LESION]
        pool += _pick(rng, [_location(p, o) for o in LESION_HOSTS for p in _PARTS], 30)
        add(5, _pick(rng, _Q_WHERE).format(w="abnormality"), les["location"], pool, les["model_slices"])
    if not lesions:
        pool = _pick(rng, decoys, len(decoys)) + _pick(
            rng, [_location(p, o) for o in LESION_HOSTS for p in _PARTS], 30
        )
        add(5, _pick(rng, _Q_WHERE).format(w="abnormality"), _NO_LESION, pool, every)
    return out


_REGION_TEXT = {
    "chest": "chest",
    "abdomen": "abdomen",
    "pelvis": "pelvis",
    "chest-abdomen": "chest and abdomen",
    "abdomen-pelvis": "abdomen and pelvis",
}
_LESION_DESC = {
    "cyst": (
        "well-circumscribed hypodense cyst",
        "simple fluid-attenuation cyst",
        "round low-density cystic lesion",
    ),
    "mass": ("lobulated hyperdense mass", "solid lobulated lesion", "hyperattenuating soft-tissue mass"),
    "calcification": ("punctate calcification", "small dense calcific focus", "tiny calcified focus"),
}


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _caption(rng: np.random.Generator, labels: dict[str, Any]) -> str:
    """A findings report for one volume, with randomised phrasing and sentence order."""
    plane, phase, region = labels["plane"], labels["phase"], _REGION_TEXT[labels["region"]]
    phase_adj = {
        "non-contrast": ("non-contrast", "unenhanced"),
        "arterial": ("arterial phase contrast-enhanced", "arterial phase"),
        "portal venous": ("portal venous phase contrast-enhanced", "portal venous phase"),
    }
    phase_when = {
        "non-contrast": "without intravenous contrast",
        "arterial": "in the arterial phase",
        "portal venous": "in the portal venous phase after intravenous contrast",
    }
    header = _pick(
        rng,
        (
            f"{_cap(plane)} {_pick(rng, phase_adj[phase])} CT of the {region}.",
            f"CT {region}, {plane} images, {phase_when[phase]}.",
            f"{_cap(plane)} CT images of the {region} acquired {phase_when[phase]}.",
        ),
    )
    lesion_lines = []
    for les in labels["lesions"]:
        desc, size, loc = _pick(rng, _LESION_DESC[les["type"]]), round(2 * les["radius_mm"]), les["location"]
        lesion_lines.append(
            _pick(
                rng,
                (
                    f"There is a {size} mm {desc} in the {loc[0].lower() + loc[1:]}.",
                    f"A {desc} measuring {size} mm is seen in the {loc[0].lower() + loc[1:]}.",
                    f"{loc}: {desc}, {size} mm.",
                ),
            )
        )
    normal = [
        o for o in ORGANS if o in labels["organs"] and o not in {les["organ"] for les in labels["lesions"]}
    ]
    other_lines = []
    if "right lung" in normal and "left lung" in normal:
        normal = [o for o in normal if not o.endswith("lung")]
        other_lines.append(
            _pick(
                rng,
                ("The lungs are clear.", "No pulmonary nodule or consolidation.", "Both lungs are clear."),
            )
        )
    if normal:
        group = _join(_pick(rng, normal, len(normal)))
        other_lines.append(
            _pick(
                rng,
                (
                    f"The {group} appear unremarkable.",
                    f"No focal abnormality in the {group}.",
                    f"Normal appearance of the {group}.",
                ),
            )
        )
    if "aorta" in labels["organs"]:
        other_lines.append(
            _pick(
                rng,
                {
                    "non-contrast": (
                        "The aorta is of normal calibre.",
                        "Normal calibre of the unenhanced aorta.",
                    ),
                    "arterial": (
                        "Dense arterial opacification of a normal-calibre aorta.",
                        "The aorta is brightly opacified and of normal calibre.",
                    ),
                    "portal venous": (
                        "The aorta is moderately opacified and of normal calibre.",
                        "Normal calibre aorta with venous-phase enhancement.",
                    ),
                }[phase],
            )
        )
    other_lines.append(
        _pick(
            rng,
            (
                "No aggressive osseous lesion.",
                "The visualised spine is intact.",
                "Osseous structures are unremarkable.",
            ),
        )
    )
    body = lesion_lines + other_lines if rng.random() < 0.7 else _pick(rng, lesion_lines + other_lines, 99)
    text = " ".join([header, *body])
    if rng.random() < 0.6:
        summary = "; ".join(f"{_LESION_WORD[x['type']]} in the {x['organ']}" for x in labels["lesions"])
        text += " Impression: " + (
            _cap(summary) + "." if summary else _pick(rng, ("No focal abnormality.", "Unremarkable study."))
        )
    return text
