"""The embedded GreenRFM default: generated chest-CT-like volumes (NIfTI, HU) with free-text reports.

Nothing is downloaded; no real patient data. ``generate`` draws each study from a fixed seed: a body
ellipse of soft tissue (40 HU) with a fat rim, two lungs (-850 HU), mediastinal fat (-100 HU), a heart, the
aorta, a vertebra, noise; then findings of the CT-RATE vocabulary, each with its own prevalence and look
(lung lesions stay inside the lungs, never over the heart, aorta or spine):

- ``pleural_effusion``: fluid (10 HU) filling the dependent, lower part of one or both lungs;
- ``lung_nodule``: three to six solid (40 HU) spheres of 10-15 mm radius in the lungs (one if faint);
- ``emphysema``: lung parenchyma at -950 HU with air cysts;
- ``cardiomegaly``: a heart 45-60 % larger;
- ``consolidation``: segmental airspace filling (30 HU, 35-45 mm radius) in the non-dependent lung,
  crossed by air bronchograms (-900 HU);
- ``lung_opacity``: two to four ground-glass (-550 HU) patches of 20-30 mm radius (one at -700 if faint);
- ``medical_material``: a metal-dense chest-wall port, its tube to the superior vena cava and the catheter
  down the vein;
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

GENERATOR_VERSION = 3
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
        present, statements = _draw_findings(rng)
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
            rows.append((_report(rng, _draw_findings(rng)[1]),))
        partial = path.with_suffix(".partial")
        _write_csv(partial, ["report"], rows)
        partial.replace(path)
    return path


def _draw_findings(rng: np.random.Generator) -> tuple[dict[str, bool], dict[str, str]]:
    """One study's findings: ({name: present}, {name: how its report treats it}), drawn in that order."""
    present = {name: bool(rng.random() < spec[0]) for name, spec in FINDINGS.items()}
    return present, {name: _statement(rng, present[name]) for name in FINDINGS}


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
    mediastinal_fat = (((x - cx) / 7) ** 2 + ((y - cy) / 10) ** 2 <= 1) & (zc > 0.35) & ~lungs
    volume[mediastinal_fat] = -100.0
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
    lungs &= volume <= lung_hu  # what the heart, aorta and spine left of the lungs: lesions stay inside
    lung_voxels = np.argwhere(lungs)
    if present["pleural_effusion"]:
        sides = [1] if rng.random() < 0.5 else [-1, 1]
        height = rng.uniform(0.25, 0.45) * (0.5 if faint["pleural_effusion"] else 1.0)
        for side in sides:
            half = (x - cx) * side > 0
            volume[lungs & half & (zc < height + 0.15) & (y < cy - 2)] = 10.0
    if present["lung_nodule"]:  # several solid nodules (one if faint)
        for _ in range(1 if faint["lung_nodule"] else rng.integers(3, 7)):
            _sphere(volume, lung_voxels[rng.integers(len(lung_voxels))], rng.uniform(1.0, 1.5), 40.0)
    if present["consolidation"]:  # segmental airspace filling, non-dependent lung, with air bronchograms
        anterior = lung_voxels[lung_voxels[:, 1] > cy]
        centre = anterior[rng.integers(len(anterior))]
        radius = rng.uniform(2.0, 2.5) if faint["consolidation"] else rng.uniform(3.5, 4.5)
        patch = _sphere(volume, centre, radius, 30.0, lungs)
        bronchi = (np.abs(x - centre[0]) < 0.6) | (np.abs(y - centre[1]) < 0.6)
        volume[patch & bronchi] = -900.0
    if present["lung_opacity"]:  # multifocal ground glass
        hu = -700.0 if faint["lung_opacity"] else -550.0
        for _ in range(1 if faint["lung_opacity"] else rng.integers(2, 5)):
            _sphere(volume, lung_voxels[rng.integers(len(lung_voxels))], rng.uniform(2.0, 3.0), hu, lungs)
    if present["medical_material"]:  # a chest-wall port, its tube to the superior vena cava, down the vein
        port = np.array([cx - 15, cy + ay - 5, 0.75])
        svc = np.array([cx + 1, cy + 2, 0.8])
        for t in np.linspace(0, 1, 24):  # the tube from the port to the vein, 1 voxel thick
            px, py, pz = port + t * (svc - port)
            volume[(np.abs(x - px) < 0.8) & (np.abs(y - py) < 0.8) & (np.abs(zc - pz) < 0.03)] = 2000.0
        tube = ((x - svc[0]) / 1.2) ** 2 + ((y - svc[1]) / 1.2) ** 2
        volume[(tube <= 1) & (zc > 0.4) & (zc < svc[2])] = 2000.0
        reservoir = ((x - port[0]) / 3) ** 2 + ((y - port[1]) / 1.5) ** 2 + ((zc - port[2]) / 0.08) ** 2
        volume[reservoir <= 1] = 2000.0
    if present["arterial_wall_calcification"]:
        wall = (aorta > 0.6) & (aorta <= 1.4) & (zc > 0.1)
        spots = wall & (rng.random(SHAPE) < (0.25 if faint["arterial_wall_calcification"] else 0.6))
        volume[spots] = 800.0
    volume += rng.normal(0, 20, SHAPE).astype(np.float32)
    return np.clip(volume, -1024, 3000)


def _sphere(volume, centre, radius_cm: float, hu: float, within: np.ndarray | None = None) -> np.ndarray:
    """Fill a sphere (radius in cm, anisotropic voxels) with ``hu``, optionally only inside ``within``;
    returns the filled mask."""
    grids = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij", sparse=True)
    distance = sum(((g - c) * s / (10 * radius_cm)) ** 2 for g, c, s in zip(grids, centre, SPACING))
    mask = distance <= 1
    if within is not None:
        mask &= within
    volume[mask] = hu
    return mask


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


class EmbeddedCTDataModule(CTDataModule):
    """``CTDataModule`` over the generated studies (made on first use under ``root``); labels are
    distilled from the reports (``labeller``, rules by default). ``num_text_only_reports``: that many more
    generated reports without a volume, as ``text_only_reports`` (0: none)."""

    def __init__(self, root: str, num_volumes: int, seed: int, num_text_only_reports: int, **kwargs):
        self.generator_args = {"num_volumes": num_volumes, "seed": seed}
        self.num_text_only_reports = num_text_only_reports
        self.generated_root = Path(root)
        # the generated manifest's layout; labels come from the reports, text-only reports from the generator
        super().__init__(manifest=str(self.generated_root / "pending.csv"), volume_column="volume",
                         report_column="report", label_columns=None, text_only_reports=None,
                         group_column=None, **kwargs)  # fmt: skip

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
