"""The embedded GreenRFM default: generated chest-CT-like volumes (NIfTI, HU) with free-text reports.

Nothing is downloaded; no real patient data. ``generate`` draws each study from a fixed seed: a body
ellipse of soft tissue (40 HU) with a fat rim, two lungs (-850 HU), a heart, the aorta, a vertebra, noise;
then findings of the CT-RATE vocabulary, each with its own prevalence and look:

- ``pleural_effusion``: fluid (10 HU) filling the dependent, lower part of one or both lungs;
- ``lung_nodule``: one to three soft-tissue spheres of 8-14 mm radius in the lungs;
- ``emphysema``: lung parenchyma at -950 HU with air cysts;
- ``cardiomegaly``: a heart 45-60 % larger;
- ``consolidation``: a dense (20 HU) patch of 20-30 mm radius;
- ``lung_opacity``: a ground-glass (-500 HU) patch of 25-35 mm radius;
- ``medical_material``: a metal-dense catheter along the superior vena cava and its port in the chest wall;
- ``arterial_wall_calcification``: calcified (800 HU) plaques on the aortic wall.

Lesions are drawn larger than life so that they remain visible at the demo's 5 mm voxels.

The report (findings + impression, in shuffled order, with normal filler sentences) states each finding
present, absent ("No pleural effusion."), hedged ("Possible ...": labelled uncertain; the volume then has
it half the time, faintly) or does not mention it. Labels are distilled from these texts by greenlab.labels,
as for real reports; ``truth.csv`` keeps what was drawn. Volumes are RAS, 64 x 64 x 40 voxels of
5 x 5 x 7.5 mm. Numbers measured on them say nothing about real patients.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from greenlab.data.ct import CTDataModule

GENERATOR_VERSION = 2
SHAPE, SPACING = (64, 64, 40), (5.0, 5.0, 7.5)
FINDINGS = {  # name: (prevalence, present sentences, negated sentences, hedged sentences)
    "pleural_effusion": (0.35, ["There is a {size} right pleural effusion.", "Bilateral pleural effusions."],
                         ["No pleural effusion.", "There is no pleural effusion."],
                         ["Possible small pleural effusion.", "Trace pleural fluid cannot be excluded."]),
    "lung_nodule": (0.35, ["A {mm} mm nodule in the {lobe}.", "Solid pulmonary nodules, the largest {mm} mm."],
                    ["No pulmonary nodules.", "There are no suspicious nodules."],
                    ["Questionable tiny nodule in the {lobe}."]),
    "emphysema": (0.3, ["Centrilobular emphysema in both lungs.", "Extensive emphysematous changes."],
                  ["No emphysema.", "No evidence of emphysema."],
                  ["Possible mild emphysema."]),
    "cardiomegaly": (0.3, ["The heart is enlarged.", "Cardiomegaly."],
                     ["No cardiomegaly.", "There is no cardiomegaly."],
                     ["Borderline cardiomegaly, cannot be excluded."]),
    "consolidation": (0.3, ["Consolidation in the {lobe}.", "There is a dense consolidation in the {lobe}."],
                      ["No consolidation.", "There is no consolidation."],
                      ["Findings may represent early consolidation."]),
    "lung_opacity": (0.3, ["Patchy ground-glass opacity in the {lobe}.", "Ground glass opacities in the {lobe}."],
                     ["No ground-glass opacity.", "There is no opacity."],
                     ["Questionable ground-glass opacity."]),
    "medical_material": (0.25, ["Central venous catheter with the tip in the superior vena cava.",
                                "A port catheter is in place."],
                         ["No catheter.", "No medical device is seen."],
                         ["Possible catheter remnant."]),
    "arterial_wall_calcification": (0.3, ["Atherosclerotic calcification of the aortic wall.",
                                          "Aortic calcification."],
                                    ["No aortic calcification.", "No atherosclerotic calcification."],
                                    ["Possible faint aortic calcification."]),
}  # fmt: skip
FILLER = [
    "The trachea and main bronchi are patent.",
    "Thyroid gland appears normal.",
    "The osseous structures are intact.",
    "The visualised upper abdomen is unremarkable.",
    "Mediastinal structures are within normal limits.",
]
LOBES = ["right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe", "middle lobe"]
MENTION = {"present": 0.85, "hedged_if_present": 0.15, "negated_if_absent": 0.55, "hedged_if_absent": 0.05}


def generate(root: Path, num_volumes: int = 200, seed: int = 0) -> Path:
    """Write the volumes, ``manifest.csv`` (volume, report) and ``truth.csv`` under ``root/<version>/``;
    reuse them when complete. Deterministic: same arguments, same voxels and reports."""
    import nibabel as nib

    params = {"version": GENERATOR_VERSION, "num_volumes": num_volumes, "seed": seed}
    folder = Path(root).expanduser() / f"embedded_ct_v{GENERATOR_VERSION}_n{num_volumes}_s{seed}"
    done = folder / "MANIFEST.json"
    if done.is_file() and json.loads(done.read_text()) == params:
        return folder
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    manifest, truth = [], []
    for index in range(num_volumes):
        present = {name: bool(rng.random() < spec[0]) for name, spec in FINDINGS.items()}
        statements = {name: _statement(rng, present[name]) for name in FINDINGS}
        faint = {n: statements[n] == "hedged" for n in FINDINGS}
        volume = _draw_chest(rng, present, faint)
        name = f"volumes/ct_{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / name)
        manifest.append((name, _report(rng, statements)))
        truth.append((name, *(int(present[n]) for n in FINDINGS), *(statements[n] for n in FINDINGS)))
    _write_csv(folder / "manifest.csv", ["volume", "report"], manifest)
    _write_csv(folder / "truth.csv", ["volume", *FINDINGS, *(f"{n}_statement" for n in FINDINGS)], truth)
    done.write_text(json.dumps(params))  # written last: marks the folder complete
    return folder


def generate_text_only_reports(folder: Path, count: int, seed: int = 1) -> Path | None:
    """``text_only_reports_n<count>_s<seed>.csv`` (one ``report`` column) in ``folder``: reports drawn like the
    studies' but with no volume, for training a text encoder alone; reused when present. None if count is 0."""
    if count <= 0:
        return None
    path = Path(folder) / f"text_only_reports_n{count}_s{seed}.csv"
    if not path.is_file():
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(count):
            present = {name: bool(rng.random() < spec[0]) for name, spec in FINDINGS.items()}
            rows.append((_report(rng, {name: _statement(rng, present[name]) for name in FINDINGS}),))
        partial = path.with_suffix(".partial")
        _write_csv(partial, ["report"], rows)
        partial.replace(path)
    return path


def _statement(rng: np.random.Generator, present: bool) -> str:
    """How the report treats a finding: present | negated | hedged | unmentioned."""
    if present:
        return "present" if rng.random() < MENTION["present"] else "hedged"
    draw = rng.random()
    if draw < MENTION["negated_if_absent"]:
        return "negated"
    return "hedged" if draw < MENTION["negated_if_absent"] + MENTION["hedged_if_absent"] else "unmentioned"


def _report(rng: np.random.Generator, statements: dict[str, str]) -> str:
    column = {"present": 1, "negated": 2, "hedged": 3}
    sentences = [
        str(rng.choice(FINDINGS[name][column[how]])).format(
            size=rng.choice(["small", "moderate", "large"]),
            mm=int(rng.integers(6, 12)),
            lobe=rng.choice(LOBES),
        )
        for name, how in statements.items()
        if how in column
    ]
    sentences += list(rng.choice(FILLER, size=2, replace=False))
    rng.shuffle(sentences)
    anything = any(how == "present" for how in statements.values())
    impression = "See findings." if anything else "No acute cardiopulmonary abnormality."
    return "FINDINGS: " + " ".join(sentences) + " IMPRESSION: " + impression


def _draw_chest(rng: np.random.Generator, present: dict[str, bool], faint: dict[str, bool]) -> np.ndarray:
    """(64, 64, 40) HU on a RAS voxel grid (indices grow towards right, anterior, superior)."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    cx, cy = SHAPE[0] / 2 + rng.normal(0, 1), SHAPE[1] / 2 + rng.normal(0, 1)
    ax, ay = 27 + rng.normal(0, 1.5), 19 + rng.normal(0, 1)
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[body <= 1] = -100.0  # fat rim
    volume[body <= 0.8] = 40.0  # soft tissue
    zc = (z - 4) / (SHAPE[2] - 8)  # 0 at the lung bases, 1 at the apices
    in_z = (zc > 0) & (zc < 1)
    lungs = np.zeros(SHAPE, dtype=bool)
    for side in (-1, 1):
        lx, ly = cx + side * 11, cy + 1
        shape = ((x - lx) / 8.5) ** 2 + ((y - ly) / 13) ** 2 + ((zc - 0.45) / 0.6) ** 2
        lungs |= (shape <= 1) & in_z
    emphysema = present["emphysema"]
    lung_hu = -950.0 if emphysema else -850.0
    if emphysema and faint["emphysema"]:
        lung_hu = -900.0
    volume[lungs] = lung_hu
    if emphysema:
        cysts = lungs & (rng.random(SHAPE) < 0.04)
        volume[cysts] = -1000.0
    heart_scale = rng.uniform(1.45, 1.6) if present["cardiomegaly"] else rng.uniform(0.9, 1.0)
    if present["cardiomegaly"] and faint["cardiomegaly"]:
        heart_scale = 1.25
    hx, hy = cx - 3, cy + 7
    heart = (
        ((x - hx) / (7 * heart_scale)) ** 2 + ((y - hy) / (6 * heart_scale)) ** 2 + ((zc - 0.3) / 0.25) ** 2
    )
    volume[heart <= 1] = 40.0
    aorta = ((x - (cx + 3)) / 3) ** 2 + ((y - (cy - 6)) / 3) ** 2
    volume[(aorta <= 1) & (zc > 0.1)] = 45.0
    spine = ((x - cx) / 4) ** 2 + ((y - (cy - ay + 6)) / 4) ** 2
    volume[spine <= 1] = 700.0
    lung_voxels = np.argwhere(lungs)
    if present["pleural_effusion"]:
        sides = [1] if rng.random() < 0.5 else [-1, 1]
        height = rng.uniform(0.25, 0.45) * (0.5 if faint["pleural_effusion"] else 1.0)
        for side in sides:
            half = (x - cx) * side > 0
            volume[lungs & half & (zc < height + 0.15) & (y < cy - 2)] = 10.0
    if present["lung_nodule"]:
        for _ in range(rng.integers(1, 4)):
            _sphere(volume, lung_voxels[rng.integers(len(lung_voxels))], rng.uniform(0.8, 1.4), 30.0)
    if present["consolidation"]:
        _sphere(volume, lung_voxels[rng.integers(len(lung_voxels))], rng.uniform(2.0, 3.0), 20.0, lungs)
    if present["lung_opacity"]:
        hu = -700.0 if faint["lung_opacity"] else -500.0
        _sphere(volume, lung_voxels[rng.integers(len(lung_voxels))], rng.uniform(2.5, 3.5), hu, lungs)
    if present["medical_material"]:
        tube = ((x - (cx + 1)) / 1.5) ** 2 + ((y - (cy + 2)) / 1.5) ** 2
        volume[(tube <= 1) & (zc > 0.4)] = 2000.0
        port = (np.abs(x - (cx - 16)) <= 2) & (np.abs(y - (cy + ay - 5)) <= 1) & (np.abs(zc - 0.75) <= 0.06)
        volume[port] = 2000.0
    if present["arterial_wall_calcification"]:
        wall = (aorta > 0.6) & (aorta <= 1.4) & (zc > 0.1)
        spots = wall & (rng.random(SHAPE) < (0.25 if faint["arterial_wall_calcification"] else 0.6))
        volume[spots] = 800.0
    volume += rng.normal(0, 20, SHAPE).astype(np.float32)
    return np.clip(volume, -1024, 3000)


def _sphere(volume, centre, radius_cm: float, hu: float, within: np.ndarray | None = None) -> None:
    """Fill a sphere (radius in cm, anisotropic voxels) with ``hu``, optionally only inside ``within``."""
    grids = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij", sparse=True)
    distance = sum(((g - c) * s / (10 * radius_cm)) ** 2 for g, c, s in zip(grids, centre, SPACING))
    mask = distance <= 1
    volume[mask & within if within is not None else mask] = hu


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


class EmbeddedCTDataModule(CTDataModule):
    """``CTDataModule`` over the generated studies (made on first use under ``root``); labels are
    distilled from the reports (``labeller``, rules by default). ``num_text_only_reports``: that many more
    generated reports without a volume, as ``text_only_reports`` (0: none)."""

    def __init__(self, root: str, num_volumes: int = 200, seed: int = 0, num_text_only_reports: int = 0,
                 **kwargs):  # fmt: skip
        self.generator_args = {"num_volumes": num_volumes, "seed": seed}
        self.num_text_only_reports = num_text_only_reports
        self.generated_root = Path(root)
        super().__init__(manifest=str(self.generated_root / "pending.csv"), **kwargs)

    def prepare_data(self) -> None:
        self._generate()

    def setup(self, stage: str | None = None) -> None:
        self._generate()
        super().setup(stage)

    def _generate(self) -> None:
        folder = generate(self.generated_root, **self.generator_args)
        self.manifest = folder / "manifest.csv"
        extra = generate_text_only_reports(
            folder, self.num_text_only_reports, self.generator_args["seed"] + 1
        )
        if extra:
            self.text_only_reports = str(extra)
