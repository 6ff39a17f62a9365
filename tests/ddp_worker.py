"""Worker for tests/test_distributed.py: one ``fit`` epoch of a small network, alone or under torchrun.

Every rank sees disjoint shards of one seeded permutation (DistributedSampler); with a per-rank batch of
B / world_size the global batches equal a single process's batches of B, so DDP's averaged gradients and the
final weights must match the single-process run. Rank 0 writes the weights to ``argv[1]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qat.data.imagefolder import ClassificationData
from qat.pipeline import fit
from qat.schema import RunConfig
from qat.train.distributed import setup, teardown

GLOBAL_BATCH = 16


def main(out: Path) -> None:
    torch.set_num_threads(1)
    runtime = setup("cpu")
    torch.manual_seed(0)
    images = torch.randn(128, 3, 8, 8)
    labels = torch.randint(0, 4, (128,))
    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // runtime.world_size, sampler=sampler)
    data = ClassificationData(loader, loader, ["a", "b", "c", "d"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    cfg = RunConfig()
    cfg.optim.weight_decay = 0.0
    fit(model, data, cfg, phase="float", epochs=2, lr=0.1, checkpoint=out.parent / f"ckpt-{out.stem}.pt",
        runtime=runtime)
    if runtime.is_main:
        torch.save(model.state_dict(), out)
    teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
