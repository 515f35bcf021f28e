"""How well the 3D ResNet-18 learns each generated finding alone: BCE on the drawn truth (``truth.csv``).

    python experiments/greenrfm/image_encoder_alone.py data/embedded/embedded_ct_v3_n280_s0 100 3e-4

(the generator draws studies in sequence, so the first 200 of the n280 folder are those of n200, where the
numbers in README.md were measured). Trains on the first 160 studies (random 56 x 56 x 32 crops, batch 10, AdamW, one-cycle lr) for STEPS steps
and prints the AUROC per finding on the first 40 (train) and the last 40 (held out) studies, centre crops.
"""

import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from greenlab.backbones.resnet3d import ResNet3D

folder, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
truth = pd.read_csv(f"{folder}/truth.csv")
findings = [c for c in truth.columns if c != "volume" and not c.endswith("_statement")]
hu = [nib.load(f"{folder}/{v}").get_fdata() for v in truth.volume]
volumes = torch.from_numpy(np.clip((np.stack(hu) + 1000) / 1200, 0, 1).astype(np.float32))[:, None]
labels = torch.tensor(truth[findings].values, dtype=torch.float32)
encoder, head = ResNet3D(18, 2, "random"), torch.nn.Linear(512, len(findings))
optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
rng, start = np.random.default_rng(0), time.time()
for step in range(steps):
    batch = rng.choice(160, 10, replace=False)
    ox, oy, oz = (rng.integers(0, 9) for _ in range(3))
    logits = head(encoder(volumes[batch, :, ox : ox + 56, oy : oy + 56, oz : oz + 32]))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
encoder.eval()
with torch.no_grad():
    for name, rows in (("train", range(0, 40)), ("held out", range(160, 200))):
        rows = list(rows)
        scores = head(encoder(volumes[rows, :, 4:60, 4:60, 4:36])).sigmoid().numpy()
        auroc = {f: round(roc_auc_score(labels[rows, j], scores[:, j]), 3) for j, f in enumerate(findings)}
        print(name, auroc, "mean", round(float(np.mean(list(auroc.values()))), 3))
print(f"{steps} steps, {time.time() - start:.0f} s")
