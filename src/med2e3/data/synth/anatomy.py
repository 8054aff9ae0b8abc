"""Anatomy and rendering: one synthetic CT volume with its label maps and ground truth.

A small parametric anatomy (body, lungs, heart, liver, spleen, kidneys, bladder, spine, aorta, iliac
arteries) is drawn with a random scanned region, contrast phase, acquisition plane and 0-3 small
lesions, and rendered on the stored voxel grid (`synthesize`, `generate_volume`). `SynthConfig`
holds what the generator draws from.

Geometry: a volume is stored as a NIfTI array of shape (W, H, D) in voxel order (i, j, k); k is
the slice (stacking) axis and points Superior (axial), Posterior (coronal) or Left (sagittal); for
an axial volume i points Left and j Posterior. The affine is exact (voxel -> RAS+ mm). Labels refer
to the stored k axis, i.e. the benchmark must be read with ``orientation="acquisition"``.

Volume ``index`` of a benchmark made with ``seed`` is ``generate_volume(case_rng(seed, index), cfg)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from med2e3.errors import ConfigError

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal venous")
REGIONS: tuple[str, ...] = ("chest", "abdomen", "pelvis", "chest-abdomen", "abdomen-pelvis")
LESION_TYPES: tuple[str, ...] = ("cyst", "mass", "calcification")
#: Organs that questions ask about (presence, abnormality, location).
ORGANS: tuple[str, ...] = (
    "right lung",
    "left lung",
    "heart",
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "urinary bladder",
)
#: Every labelled structure; its index + 1 is its value in ``SynthCase.organ_map``.
STRUCTURES: tuple[str, ...] = ORGANS + ("spine", "aorta", "iliac arteries")
STRUCTURE_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES)}

_ORGAN_REGION = {
    "right lung": "chest",
    "left lung": "chest",
    "heart": "chest",
    "liver": "abdomen",
    "spleen": "abdomen",
    "right kidney": "abdomen",
    "left kidney": "abdomen",
    "urinary bladder": "pelvis",
}
#: Lesion types each organ may carry (one lesion per organ, distinct types per volume).
LESION_HOSTS: dict[str, tuple[str, ...]] = {
    "liver": LESION_TYPES,
    "spleen": LESION_TYPES,
    "right kidney": LESION_TYPES,
    "left kidney": LESION_TYPES,
    "right lung": ("mass", "calcification"),
    "left lung": ("mass", "calcification"),
    "urinary bladder": ("mass", "calcification"),
}
_PARTS = ("upper", "middle", "lower")
_BAND_MARGIN_MM = 3.0  # organs stay this far inside their region's S-I band


# ---------------------------------------------------------------------------------------------
# Configuration


def _default_probs(names: Sequence[str], probs: Sequence[float]) -> Any:
    return field(default_factory=lambda: dict(zip(names, probs, strict=True)))


@dataclass(frozen=True)
class SynthConfig:
    """What the generator draws from. Probabilities are per-name weights (missing names: 0).

    ``shape`` is (D, H, W): D slices along the stored k axis, H rows (j), W columns (i); the
    stored NIfTI array is (W, H, D). Radii are in mm and are capped so that a lesion spans at most
    ``max_lesion_model_slices`` of the ``n_model_slices`` model slices.
    """

    shape: tuple[int, int, int] = (32, 96, 96)
    n_model_slices: int = 32
    fov_mm: float = 360.0
    plane_probs: dict[str, float] = _default_probs(PLANES, (0.7, 0.15, 0.15))
    phase_probs: dict[str, float] = _default_probs(PHASES, (0.3, 0.3, 0.4))
    region_probs: dict[str, float] = _default_probs(REGIONS, (0.25, 0.25, 0.15, 0.15, 0.2))
    lesion_count_probs: tuple[float, ...] = (0.1, 0.25, 0.35, 0.3)  # P(0, 1, 2, 3 lesions)
    cyst_radius_mm: tuple[float, float] = (6.0, 12.0)
    mass_radius_mm: tuple[float, float] = (8.0, 14.0)
    calcification_radius_mm: tuple[float, float] = (2.0, 4.0)
    max_lesion_model_slices: int = 4
    noise_hu: tuple[float, float] = (10.0, 20.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise ConfigError(f"shape: need three sizes >= 16 (D, H, W), got {self.shape}")
        if self.n_model_slices < 1:
            raise ConfigError(f"n_model_slices: must be >= 1, got {self.n_model_slices}")
        if not 1 <= self.max_lesion_model_slices <= self.n_model_slices:
            raise ConfigError(f"max_lesion_model_slices: must be in 1..{self.n_model_slices}")
        if self.fov_mm <= 0:
            raise ConfigError(f"fov_mm: must be positive, got {self.fov_mm}")
        for name, allowed in (("plane_probs", PLANES), ("phase_probs", PHASES), ("region_probs", REGIONS)):
            _check_probs(name, getattr(self, name), allowed)
        if (
            len(self.lesion_count_probs) != 4
            or min(self.lesion_count_probs) < 0
            or sum(self.lesion_count_probs) <= 0
        ):
            raise ConfigError("lesion_count_probs: need four non-negative weights for 0-3 lesions")
        for name in ("cyst_radius_mm", "mass_radius_mm", "calcification_radius_mm", "noise_hu"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(f"{name}: need 0 <= low <= high, got {(lo, hi)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def _check_probs(name: str, probs: dict[str, float], allowed: Sequence[str]) -> None:
    unknown = sorted(set(probs) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown name(s) {unknown}; allowed: {list(allowed)}")
    if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
        raise ConfigError(f"{name}: weights must be non-negative with a positive sum, got {probs}")


def _draw(rng: np.random.Generator, names: Sequence[str], probs: dict[str, float]) -> str:
    p = np.array([probs.get(n, 0.0) for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws volume ``index`` of a benchmark made with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))


def model_slices(stored: Iterable[int] | np.ndarray, depth: int, n_model: int = 32) -> list[int]:
    """Sorted model slices m whose stored interval [m*K/n, (m+1)*K/n) overlaps a stored slice [k, k+1)."""
    k = np.unique(np.asarray(stored if isinstance(stored, np.ndarray) else list(stored), dtype=np.int64))
    if k.size == 0:
        return []
    lo = (k * n_model) // depth  # first m overlapping slice k
    hi = -((-(k + 1) * n_model) // depth)  # one past the last
    marks = np.zeros(n_model + 1, dtype=np.int64)
    np.add.at(marks, lo, 1)
    np.add.at(marks, np.minimum(hi, n_model), -1)
    return np.nonzero(np.cumsum(marks)[:n_model] > 0)[0].tolist()


# ---------------------------------------------------------------------------------------------
# Geometry: the stored voxel grid in patient space (x: Right+, y: Anterior+, z: Superior+, mm)


@dataclass(frozen=True)
class _Grid:
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # mm of voxel centres along stored axes i, j, k
    world_axis: tuple[int, int, int]  # RAS axis (0 x, 1 y, 2 z) each stored axis runs along
    affine: np.ndarray  # (4, 4) voxel -> RAS+ mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.coords[0]), len(self.coords[1]), len(self.coords[2]))

    def xyz(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """World (X, Y, Z) as arrays broadcastable to the box's (i, j, k) shape."""
        out: list[np.ndarray] = [np.empty(0)] * 3
        for a in range(3):
            view = [1, 1, 1]
            view[a] = -1
            out[self.world_axis[a]] = self.coords[a][box[a]].reshape(view)
        return out

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels whose centres lie in the world box [lo, hi]; None if empty."""
        out = []
        for a in range(3):
            w = self.world_axis[a]
            idx = np.nonzero((self.coords[a] >= lo[w]) & (self.coords[a] <= hi[w]))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return (out[0], out[1], out[2])

    @property
    def full(self) -> tuple[slice, slice, slice]:
        return (slice(None), slice(None), slice(None))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(abs(c[1] - c[0])) for c in self.coords)  # type: ignore[return-value]


def _make_grid(axes: Sequence[tuple[int, int, float, float, int]]) -> _Grid:
    """Grid from per-stored-axis (world axis, direction sign, world low, world high, size)."""
    coords, world_axis = [], []
    affine = np.eye(4)
    for a, (w, sign, lo, hi, n) in enumerate(axes):
        step = (hi - lo) / n
        centres = lo + step * (np.arange(n) + 0.5)
        c = centres if sign > 0 else centres[::-1]
        coords.append(c.astype(np.float32))  # float32 is ample for shapes and halves the work
        world_axis.append(w)
        affine[:3, a] = 0.0
        affine[w, a] = sign * step
        affine[w, 3] = c[0]
    return _Grid((coords[0], coords[1], coords[2]), (world_axis[0], world_axis[1], world_axis[2]), affine)


# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class _Body:
    z_pelvis: float  # top of the pelvis band (pelvic floor is z = 0)
    z_diaphragm: float  # top of the abdomen band
    z_apex: float  # top of the chest band
    land_z: tuple[float, ...]  # landmarks of the body outline along z
    land_a: tuple[float, ...]  # R-L semi-axis at the landmarks (mm)
    land_b: tuple[float, ...]  # A-P semi-axis at the landmarks (mm)
    fat_mm: float  # subcutaneous fat thickness

    def z_range(self, region: str) -> tuple[float, float]:
        bands = {
            "pelvis": (0.0, self.z_pelvis),
            "abdomen": (self.z_pelvis, self.z_diaphragm),
            "chest": (self.z_diaphragm, self.z_apex),
        }
        lows, highs = zip(*(bands[p] for p in region.split("-")), strict=True)
        return min(lows), max(highs)

    def semi_axes(self, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Outer R-L and A-P semi-axes (mm) of the body at height z."""
        return np.asarray(np.interp(z, self.land_z, self.land_a)), np.asarray(
            np.interp(z, self.land_z, self.land_b)
        )


_Wave = tuple[float, tuple[float, float, float], float]  # amplitude, frequency vector, phase


@dataclass(frozen=True)
class _Blob:
    """A jittered ellipsoid: |q| <= 1 + sum(amp * cos(2 pi f.q + phi)), q = (p - centre) / radii."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    waves: tuple[_Wave, ...]
    z_band: tuple[float, float]

    def depth(self, xyz: list[np.ndarray]) -> np.ndarray:
        """1 - |q| / threshold: positive inside, ~1 at the centre."""
        q = [(xyz[w] - self.centre[w]) / self.radii[w] for w in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        thr: np.ndarray | float = 1.0
        for amp, f, phi in self.waves:
            thr = thr + amp * np.cos(2 * np.pi * (f[0] * q[0] + f[1] * q[1] + f[2] * q[2]) + phi)
        inside_band = (xyz[2] >= self.z_band[0]) & (xyz[2] <= self.z_band[1])
        return np.where(inside_band, 1.0 - rho / thr, -1.0)

    def bounds(self) -> tuple[list[float], list[float]]:
        lo = [self.centre[w] - 1.3 * self.radii[w] for w in range(3)]
        hi = [self.centre[w] + 1.3 * self.radii[w] for w in range(3)]
        lo[2], hi[2] = max(lo[2], self.z_band[0]), min(hi[2], self.z_band[1])
        return lo, hi


def _sample_body(rng: np.random.Generator) -> _Body:
    size = rng.uniform(0.88, 1.1)
    z_pel = rng.uniform(185.0, 215.0) * size
    z_dia = z_pel + rng.uniform(205.0, 235.0) * size
    z_apex = z_dia + rng.uniform(250.0, 290.0) * size
    jit = rng.uniform(0.95, 1.05, size=(2, 5))
    land_z = (0.0, z_pel, 0.5 * (z_pel + z_dia), z_dia, z_apex)
    land_a = tuple(float(v) for v in size * jit[0] * np.array([165.0, 160.0, 150.0, 160.0, 140.0]))
    land_b = tuple(float(v) for v in size * jit[1] * np.array([110.0, 110.0, 112.0, 118.0, 108.0]))
    return _Body(z_pel, z_dia, z_apex, land_z, land_a, land_b, float(rng.uniform(10.0, 22.0)))


def _waves(rng: np.random.Generator, n: int = 3, amp: float = 0.06) -> tuple[_Wave, ...]:
    """Random low-frequency boundary perturbations (amplitude, frequency vector, phase)."""
    out: list[_Wave] = []
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        f = direction * rng.uniform(0.4, 1.1)  # cycles per unit of normalised radius
        freq = (float(f[0]), float(f[1]), float(f[2]))
        out.append((float(rng.uniform(0.3, 1.0) * amp), freq, float(rng.uniform(0, 2 * np.pi))))
    return tuple(out)


def _organ_blobs(rng: np.random.Generator, body: _Body) -> list[_Blob]:
    """The eight solid organs, in paint order (later overrides earlier)."""
    bands = {r: body.z_range(r) for r in ("chest", "abdomen", "pelvis")}

    def band(region: str) -> tuple[float, float]:
        lo, hi = bands[region]
        return lo + _BAND_MARGIN_MM, hi - _BAND_MARGIN_MM

    def inner(z: float) -> tuple[float, float]:
        a, b = body.semi_axes(z)
        return float(a) - body.fat_mm, float(b) - body.fat_mm

    def j(scale: float = 0.08) -> float:
        return float(rng.uniform(1 - scale, 1 + scale))

    zc0, zc1 = bands["chest"]
    za0, za1 = bands["abdomen"]
    hc, ha, hp = zc1 - zc0, za1 - za0, bands["pelvis"][1]
    a_c, b_c = inner(zc0 + 0.4 * hc)
    a_a, b_a = inner(za0 + 0.6 * ha)
    a_p, b_p = inner(0.4 * hp)
    specs = [
        ("right lung", (0.52 * a_c, -0.05 * b_c, zc0 + 0.42 * hc), (0.38 * a_c, 0.78 * b_c, 0.62 * hc)),
        ("left lung", (-0.52 * a_c, -0.05 * b_c, zc0 + 0.42 * hc), (0.36 * a_c, 0.75 * b_c, 0.60 * hc)),
        ("liver", (0.32 * a_a, 0.02 * b_a, za1 - 0.30 * ha), (0.50 * a_a, 0.70 * b_a, 0.36 * ha)),
        ("spleen", (-0.55 * a_a, -0.30 * b_a, za1 - 0.25 * ha), (0.18 * a_a, 0.33 * b_a, 0.20 * ha)),
        ("right kidney", (0.40 * a_a, -0.48 * b_a, za1 - 0.62 * ha), (0.15 * a_a, 0.22 * b_a, 0.20 * ha)),
        ("left kidney", (-0.40 * a_a, -0.48 * b_a, za1 - 0.58 * ha), (0.15 * a_a, 0.22 * b_a, 0.20 * ha)),
        ("urinary bladder", (0.0, 0.35 * b_p, 0.38 * hp), (0.30 * a_p, 0.30 * b_p, 0.22 * hp)),
        ("heart", (-0.12 * a_c, 0.30 * b_c, zc0 + 0.20 * hc), (0.38 * a_c, 0.42 * b_c, 0.28 * hc)),
    ]
    blobs = []
    for name, centre, radii in specs:
        c = (centre[0] + rng.normal(0, 4), centre[1] + rng.normal(0, 4), centre[2] + rng.normal(0, 6))
        r = (radii[0] * j(), radii[1] * j(), radii[2] * j())
        blobs.append(_Blob(name, c, r, _waves(rng), band(_ORGAN_REGION[name])))
    return blobs


# intensities (HU) per phase: non-contrast, arterial, portal venous
_HU = {
    "soft tissue": (42, 50, 60),
    "fat": (-100, -100, -100),
    "lung": (-850, -850, -850),
    "liver": (58, 75, 110),
    "spleen": (48, 105, 120),
    "kidney cortex": (35, 175, 175),
    "kidney medulla": (32, 95, 165),
    "heart blood": (42, 260, 150),
    "myocardium": (45, 95, 100),
    "aorta": (42, 340, 160),
    "bladder": (6, 6, 8),
    "bone cortex": (850, 850, 850),
    "bone marrow": (300, 300, 300),
    "disc": (80, 80, 80),
}


def _intensities(rng: np.random.Generator, phase: str) -> dict[str, float]:
    p = PHASES.index(phase)
    hu = {k: float(v[p] + rng.normal(0, 5)) for k, v in _HU.items()}
    hu["aorta"] = float({0: rng.uniform(35, 50), 1: rng.uniform(300, 420), 2: rng.uniform(140, 190)}[p])
    hu["heart blood"] = float(hu["aorta"] * ({0: 1.0, 1: 0.8, 2: 0.95}[p]))
    hu["lung"] = float(rng.uniform(-880, -820))
    hu["bone cortex"] = float(rng.uniform(700, 1000))
    hu["bone marrow"] = float(rng.uniform(250, 400))
    return hu


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class SynthCase:
    """One synthetic volume with its ground truth.

    ``volume`` is int16 HU in stored voxel order (W, H, D); ``organ_map`` holds ``STRUCTURE_ID``
    values (0: air, body wall, fat) and ``lesion_map`` the 1-based index into ``labels["lesions"]``.
    """

    volume: np.ndarray  # (W, H, D) int16
    affine: np.ndarray  # (4, 4) voxel -> RAS+ mm
    labels: dict[str, Any]
    organ_map: np.ndarray  # (W, H, D) uint8
    lesion_map: np.ndarray  # (W, H, D) uint8


def _scan_grid(rng: np.random.Generator, cfg: SynthConfig, body: _Body, plane: str, region: str) -> _Grid:
    d, h, w = cfg.shape
    z0, z1 = body.z_range(region)
    zs = np.linspace(z0, z1, 64)
    a_min, b_min = (float(v.min()) for v in body.semi_axes(zs))
    cx, cy = rng.uniform(-10, 10), rng.uniform(-15, 15)  # table offset of the FOV centre
    half = cfg.fov_mm / 2
    if plane == "axial":  # i -> L, j -> P, k -> S
        half_y = half * h / w
        return _make_grid(
            [(0, -1, cx - half, cx + half, w), (1, -1, cy - half_y, cy + half_y, h), (2, 1, z0, z1, d)]
        )
    if plane == "coronal":  # i -> L, j -> I, k -> P; slices stay inside the body's A-P extent
        return _make_grid(
            [(0, -1, cx - half, cx + half, w), (2, -1, z0, z1, h), (1, -1, -0.9 * b_min, 0.9 * b_min, d)]
        )
    half_ap = 0.8 * half  # sagittal: i -> P, j -> I, k -> L
    return _make_grid(
        [(1, -1, cy - half_ap, cy + half_ap, w), (2, -1, z0, z1, h), (0, -1, -0.9 * a_min, 0.9 * a_min, d)]
    )


def _render_body(
    grid: _Grid, body: _Body, hu_of: dict[str, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hu float32, body mask, inner-body mask), all (W, H, D)."""
    x, y, z = grid.xyz(grid.full)
    a, b = body.semi_axes(z)
    outer = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    inner = (x / (a - body.fat_mm)) ** 2 + (y / (b - body.fat_mm)) ** 2 <= 1.0
    outer, inner = np.broadcast_arrays(outer, inner)
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    hu[outer] = hu_of["fat"]
    field_ = np.zeros((), dtype=np.float32)
    for _ in range(3):  # smooth low-frequency texture of the soft tissue, +-15 HU
        f = rng.uniform(1 / 160, 1 / 50, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        field_ = field_ + 5.0 * (
            np.cos(2 * np.pi * f[0] * x + ph[0])
            * np.cos(2 * np.pi * f[1] * y + ph[1])
            * np.cos(2 * np.pi * f[2] * z + ph[2])
        ).astype(np.float32)
    hu[inner] = (hu_of["soft tissue"] + np.broadcast_to(field_, grid.shape))[inner]
    return hu, outer.copy(), inner.copy()


def _paint_organs(
    grid: _Grid,
    blobs: list[_Blob],
    hu: np.ndarray,
    inner: np.ndarray,
    organ_map: np.ndarray,
    hu_of: dict[str, float],
) -> dict[str, _Host]:
    """Paint the solid organs (later blobs override earlier ones); returns the possible lesion hosts."""
    depths = {}
    for blob in blobs:
        box = grid.box(*blob.bounds())
        if box is None:
            continue
        dep = blob.depth(grid.xyz(box)).astype(np.float32)  # box shape
        mask = (dep > 0) & inner[box]
        if not mask.any():
            continue
        sub_hu, sub_map = hu[box], organ_map[box]
        sub_map[mask] = STRUCTURE_ID[blob.name]
        if blob.name.endswith("lung"):
            sub_hu[mask] = hu_of["lung"]
        elif blob.name.endswith("kidney"):
            sub_hu[mask] = np.where(dep[mask] < 0.35, hu_of["kidney cortex"], hu_of["kidney medulla"])
        elif blob.name == "heart":
            sub_hu[mask] = np.where(dep[mask] < 0.2, hu_of["myocardium"], hu_of["heart blood"])
        else:
            sub_hu[mask] = hu_of["bladder" if blob.name == "urinary bladder" else blob.name]
        depths[blob.name] = _Host(blob.name, box, dep, float(min(blob.radii)))
    return depths


def _paint_vessels_and_spine(
    rng: np.random.Generator,
    grid: _Grid,
    body: _Body,
    hu: np.ndarray,
    inner: np.ndarray,
    organ_map: np.ndarray,
    hu_of: dict[str, float],
) -> None:
    """Iliac arteries, aorta (anterior to the spine) and spine (posterior midline, all regions)."""
    a_abd, b_abd = (float(v) - body.fat_mm for v in body.semi_axes(0.5 * (body.z_pelvis + body.z_diaphragm)))
    y_sp = -0.6 * b_abd + rng.normal(0, 3)
    vb_rx, vb_ry = rng.uniform(17, 22), rng.uniform(14, 18)  # vertebral body semi-axes
    r_ao = rng.uniform(10, 13)
    x_ao, y_ao = -0.08 * a_abd + rng.normal(0, 2), y_sp + vb_ry + r_ao + 3
    z_bif = body.z_pelvis + rng.uniform(15, 35)
    z_top = body.z_apex + 50
    r_il, z_il = rng.uniform(6, 8), 0.25 * body.z_pelvis

    def paint(name: str, lo: list[float], hi: list[float], fn: Any, value: Any) -> None:
        box = grid.box(lo, hi)
        if box is None:
            return
        xyz = grid.xyz(box)
        shape = tuple(s.stop - s.start for s in box)
        mask = np.broadcast_to(fn(*xyz), shape) & inner[box]
        vals = np.broadcast_to(value(*xyz) if callable(value) else value, shape)
        hu[box][mask] = vals[mask]
        organ_map[box][mask] = STRUCTURE_ID[name]

    for side in (1, -1):  # iliac arteries: straight tubes from the bifurcation to the low pelvis
        x1, y1 = side * 0.35 * a_abd, y_ao + 15

        def tube(x: np.ndarray, y: np.ndarray, z: np.ndarray, x1: float = x1, y1: float = y1) -> np.ndarray:
            t = np.clip((z_bif - z) / (z_bif - z_il), 0, 1)
            return ((x - (x_ao + t * (x1 - x_ao))) ** 2 + (y - (y_ao + t * (y1 - y_ao))) ** 2 <= r_il**2) & (
                (z >= z_il) & (z <= z_bif)
            )

        paint(
            "iliac arteries",
            [min(x_ao, x1) - 10, min(y_ao, y1) - 10, z_il],
            [max(x_ao, x1) + 10, max(y_ao, y1) + 10, z_bif],
            tube,
            hu_of["aorta"],
        )
    paint(
        "aorta",
        [x_ao - r_ao - 1, y_ao - r_ao - 1, z_bif],
        [x_ao + r_ao + 1, y_ao + r_ao + 1, z_top],
        lambda x, y, z: ((x - x_ao) ** 2 + (y - y_ao) ** 2 <= r_ao**2) & (z >= z_bif),
        hu_of["aorta"],
    )

    period, disc, z_phase = rng.uniform(26, 32), rng.uniform(5, 7), rng.uniform(0, 30)
    y_pe = y_sp - vb_ry - 10  # posterior elements

    def spine(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:  # same cross-section at every z
        vb = (x / vb_rx) ** 2 + ((y - y_sp) / vb_ry) ** 2 <= 1
        pe = (x / 7.0) ** 2 + ((y - y_pe) / 12.0) ** 2 <= 1
        return vb | pe

    def spine_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        e = (x / vb_rx) ** 2 + ((y - y_sp) / vb_ry) ** 2
        in_disc = np.mod(z - z_phase, period) < disc
        bone = np.where(e > 0.6, hu_of["bone cortex"], hu_of["bone marrow"])
        bone = np.where(e > 1, hu_of["bone cortex"], bone)  # posterior elements: cortical
        return np.where(in_disc & (e <= 1), hu_of["disc"], bone)

    paint("spine", [-vb_rx - 1, y_pe - 13, -1e9], [vb_rx + 1, y_sp + vb_ry + 1, 1e9], spine, spine_hu)


def _lesion_lobes(rng: np.random.Generator, kind: str, r: float) -> list[tuple[np.ndarray, float]]:
    """Lesion as a union of balls (centre offset in mm, radius) around the lesion centre."""
    if kind == "mass":  # lobulated: a core plus lobes that stay inside radius r
        lobes = [(np.zeros(3), 0.6 * r)]
        for _ in range(int(rng.integers(3, 6))):
            rl = rng.uniform(0.4, 0.6) * r
            d = rng.normal(size=3)
            lobes.append((d / np.linalg.norm(d) * rng.uniform(0.3, 1.0) * (r - rl), rl))
        return lobes
    return [(np.zeros(3), r)]


def _render_lesion(
    grid: _Grid, centre: np.ndarray, lobes: list[tuple[np.ndarray, float]], r: float
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    box = grid.box(list(centre - r - 0.5), list(centre + r + 0.5))
    if box is None:
        return None
    x, y, z = grid.xyz(box)
    mask = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    for off, rl in lobes:
        c = centre + off
        mask |= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= rl**2
    return box, mask


def _lesion_hu(rng: np.random.Generator, kind: str, organ: str, hu_of: dict[str, float]) -> float:
    if kind == "cyst":
        return float(rng.uniform(0, 15))
    if kind == "calcification":
        return float(rng.uniform(800, 1200))
    if organ.endswith("lung"):
        return float(rng.uniform(25, 50))
    base = {
        "liver": [hu_of["liver"]],
        "spleen": [hu_of["spleen"]],
        "urinary bladder": [hu_of["bladder"]],
    }.get(organ, [hu_of["kidney cortex"], hu_of["kidney medulla"]])
    return float(max(max(base), 20.0) + rng.uniform(30, 60))


@dataclass(frozen=True)
class _Host:
    """An organ that may carry a lesion: its box, shape depth on the box, smallest radius (mm)."""

    name: str
    box: tuple[slice, slice, slice]
    depth: np.ndarray  # box shape, 1 - |q| / threshold
    min_radius: float


def _place_lesions(
    rng: np.random.Generator,
    cfg: SynthConfig,
    grid: _Grid,
    hu: np.ndarray,
    organ_map: np.ndarray,
    hosts: dict[str, _Host],
    hu_of: dict[str, float],
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Draw 0-3 lesions of distinct types in distinct organs; paint them; return labels + lesion map."""
    lesion_map = np.zeros(grid.shape, dtype=np.uint8)
    n_want = int(rng.choice(4, p=np.array(cfg.lesion_count_probs) / sum(cfg.lesion_count_probs)))
    kinds = [LESION_TYPES[i] for i in rng.permutation(3)[:n_want]]
    free = [
        o for o in LESION_HOSTS if o in hosts and (organ_map[hosts[o].box] == STRUCTURE_ID[o]).sum() >= 30
    ]
    dk, depth, n_ms = grid.spacing[2], grid.shape[2], cfg.n_model_slices
    # cap: a voxel-centred ball spans s = 2 floor(r/dk) + 1 stored slices, i.e. <= ceil(s n/K) + 1 model
    # slices; keep that <= max (a lesion that still spans more is shrunk in _fit_lesion)
    half = math.floor(((cfg.max_lesion_model_slices - 1) * depth / n_ms - 1) / 2)
    r_cap = 0.98 * dk * (half + 1) if half >= 0 else 0.45 * dk
    lesions: list[dict[str, Any]] = []
    for kind in kinds:
        options = [o for o in free if kind in LESION_HOSTS[o]]
        if not options:
            continue
        organ = options[int(rng.integers(len(options)))]
        free.remove(organ)
        lo, hi = {
            "cyst": cfg.cyst_radius_mm,
            "mass": cfg.mass_radius_mm,
            "calcification": cfg.calcification_radius_mm,
        }[kind]
        r = float(min(rng.uniform(lo, hi), r_cap))
        lobes = _lesion_lobes(rng, kind, r)
        placed = _fit_lesion(
            rng,
            grid,
            organ_map,
            hosts[organ],
            _PARTS[int(rng.integers(3))],
            lobes,
            r,
            n_ms,
            cfg.max_lesion_model_slices,
        )
        if placed is None:
            continue
        vox, box, mask, r = placed
        value = _lesion_hu(rng, kind, organ, hu_of)
        hu[box][mask] = value
        lesion_map[box][mask] = len(lesions) + 1
        ks = np.nonzero(mask.any(axis=(0, 1)))[0] + box[2].start
        centre = grid.affine[:3, :3] @ np.array(vox, dtype=float) + grid.affine[:3, 3]
        z_lo, z_hi = _z_extent(grid, organ_map, hosts[organ])
        t = (centre[2] - z_lo) / max(z_hi - z_lo, 1e-6)  # 0 at the organ's inferior end, 1 at its top
        part = "upper" if t >= 2 / 3 else "lower" if t < 1 / 3 else "middle"
        lesions.append(
            {
                "type": kind,
                "organ": organ,
                "part": part,
                "location": _location(part, organ),
                "center_voxel": [int(v) for v in vox],
                "center_mm": [round(float(v), 2) for v in centre],
                "radius_mm": round(r, 2),
                "hu": round(value, 1),
                "voxels": int(mask.sum()),
                "stored_slices": [int(ks.min()), int(ks.max())],
                "model_slices": model_slices(ks, depth, n_ms),
            }
        )
    return lesions, lesion_map


def _z_extent(grid: _Grid, organ_map: np.ndarray, host: _Host) -> tuple[float, float]:
    """Lowest and highest z (mm) of the organ's voxel centres."""
    mask = organ_map[host.box] == STRUCTURE_ID[host.name]
    z = np.broadcast_to(grid.xyz(host.box)[2], mask.shape)[mask]
    return float(z.min()), float(z.max())


def _fit_lesion(
    rng: np.random.Generator,
    grid: _Grid,
    organ_map: np.ndarray,
    host: _Host,
    part: str,
    lobes: list[tuple[np.ndarray, float]],
    r: float,
    n_ms: int,
    max_ms: int,
) -> tuple[tuple[int, int, int], tuple[slice, slice, slice], np.ndarray, float] | None:
    """(centre voxel, box, mask, radius) of a lesion inside the organ, in the wanted third if possible.

    Candidate centres are voxels deep inside the organ; tiers relax the constraints when none fits.
    The mask is always clipped to the organ, and shrunk until it spans <= max_ms model slices.
    """
    organ_id = STRUCTURE_ID[host.name]
    in_organ = organ_map[host.box] == organ_id  # box shape
    z_lo, z_hi = _z_extent(grid, organ_map, host)
    z = np.broadcast_to(grid.xyz(host.box)[2], in_organ.shape)
    t = (z - z_lo) / max(z_hi - z_lo, 1e-6)
    band = {"upper": (0.72, 0.92), "middle": (0.42, 0.58), "lower": (0.08, 0.28)}[part]
    start = np.array([s.start for s in host.box])
    away = np.ones(in_organ.shape, dtype=bool)  # centre far enough from the grid's faces
    for a, idx in enumerate(np.indices(in_organ.shape, sparse=True)):
        m = math.ceil(r / grid.spacing[a]) + 1
        away = away & (idx + start[a] >= m) & (idx + start[a] < grid.shape[a] - m)
    deep = host.depth >= min(0.8, 1.3 * r / host.min_radius)
    in_band = (t >= band[0]) & (t <= band[1])
    last = None
    for cand in (in_organ & away & deep & in_band, in_organ & away & deep, in_organ & away, in_organ):
        pts = np.argwhere(cand)
        for p in pts[rng.permutation(len(pts))[:12]]:
            vox = p + start
            centre = grid.affine[:3, :3] @ vox + grid.affine[:3, 3]
            for scale in 0.8 ** np.arange(8):  # shrink until the lesion spans <= max_ms model slices
                out = _render_lesion(grid, centre, [(o * scale, rl * scale) for o, rl in lobes], r * scale)
                if out is None:
                    break
                box, shape_mask = out
                mask = shape_mask & (organ_map[box] == organ_id)
                ks = np.nonzero(mask.any(axis=(0, 1)))[0] + box[2].start
                if len(model_slices(ks, grid.shape[2], n_ms)) <= max_ms:
                    break
            if out is None or not mask.any():
                continue
            last = ((int(vox[0]), int(vox[1]), int(vox[2])), box, mask, float(r * scale))
            if (mask == shape_mask).all():
                return last
    return last


def _location(part: str, organ: str) -> str:
    """Human location phrase, e.g. 'Lower pole of the left kidney'."""
    words = {
        "kidney": ("upper pole", "interpolar region", "lower pole"),
        "lung": ("upper zone", "mid zone", "lower zone"),
        "urinary bladder": ("dome", "body", "base"),
    }
    key = "kidney" if organ.endswith("kidney") else "lung" if organ.endswith("lung") else organ
    names = words.get(key, ("upper part", "middle part", "lower part"))
    return f"{names[_PARTS.index(part)].capitalize()} of the {organ}"


def synthesize(rng: np.random.Generator, cfg: SynthConfig) -> SynthCase:
    """Draw one volume with its label maps and ground truth (see module docstring for geometry)."""
    plane = _draw(rng, PLANES, cfg.plane_probs)
    phase = _draw(rng, PHASES, cfg.phase_probs)
    region = _draw(rng, REGIONS, cfg.region_probs)
    body = _sample_body(rng)
    grid = _scan_grid(rng, cfg, body, plane, region)
    hu_of = _intensities(rng, phase)
    hu, body_mask, inner = _render_body(grid, body, hu_of, rng)
    organ_map = np.zeros(grid.shape, dtype=np.uint8)
    depths = _paint_organs(grid, _organ_blobs(rng, body), hu, inner, organ_map, hu_of)
    _paint_vessels_and_spine(rng, grid, body, hu, inner, organ_map, hu_of)
    lesions, lesion_map = _place_lesions(rng, cfg, grid, hu, organ_map, depths, hu_of)
    sigma = float(rng.uniform(*cfg.noise_hu))
    hu[body_mask] += rng.standard_normal(int(body_mask.sum()), dtype=np.float32) * sigma
    volume = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    depth, n_ms = grid.shape[2], cfg.n_model_slices
    organs: dict[str, dict[str, Any]] = {}
    for name in STRUCTURES:
        ks = np.nonzero((organ_map == STRUCTURE_ID[name]).any(axis=(0, 1)))[0]
        if ks.size:
            organs[name] = {
                "voxels": int((organ_map == STRUCTURE_ID[name]).sum()),
                "stored_slices": [int(ks.min()), int(ks.max())],
                "model_slices": model_slices(ks, depth, n_ms),
            }
    arteries = sorted(
        {m for n in ("aorta", "iliac arteries") if n in organs for m in organs[n]["model_slices"]}
    )
    labels = {
        "plane": plane,
        "phase": phase,
        "region": region,
        "shape": list(grid.shape),
        "spacing": [round(s, 4) for s in grid.spacing],
        "affine": [[round(float(v), 4) for v in row] for row in grid.affine],
        "slice_axis": 2,
        "n_model_slices": n_ms,
        "noise_hu": round(sigma, 2),
        "organs": organs,
        "lesions": lesions,
        "artery_model_slices": arteries or list(range(n_ms)),
        "intensities": {k: round(v, 1) for k, v in hu_of.items()},
    }
    return SynthCase(volume, grid.affine.copy(), labels, organ_map, lesion_map)


def generate_volume(
    rng: np.random.Generator, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One synthetic CT: (int16 HU array (W, H, D) in stored voxel order, 4x4 RAS+ affine, labels)."""
    case = synthesize(rng, cfg)
    return case.volume, case.affine, case.labels
