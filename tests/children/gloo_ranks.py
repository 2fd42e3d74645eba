"""Programs the multi-process tests start on every rank with torchrun (gloo, 127.0.0.1):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m children.gloo_ranks SCENARIO OUT_DIR

Each rank compares what it computed under the process group with what one process computes on the whole global
batch (the same seeds on every rank), and writes ``OUT_DIR/<scenario>_<rank>.json``; the test reads the files.

* ``syncbn``: a conv-BN network, BatchNorm converted by ``engine.batchnorm`` (the CPU path of SyncBatchNorm), DDP,
  half the batch per rank: after one SGD step the weights and running statistics must equal one process's plain
  BatchNorm network trained on the whole batch.
* ``accumulation``: a BatchNorm-free network under DDP, each rank's share of the global batch in micro-batches
  (``engine.loop.split_batch`` + ``backward_accumulated``): after one step every rank holds the same weights, equal to
  one process's step on the whole batch.
* ``validation BETON``: the validation loader's shards and ``evaluate_classifier``'s sum over the ranks: every image
  counted once.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GLOBAL_BATCH = 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def syncbn(rank: int, world: int) -> dict[str, float]:
    from engine.batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm

    def net() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
        with torch.no_grad():  # not the defaults: a wrong affine term would not show with weight 1, bias 0
            m[1].weight.uniform_(0.5, 1.5)
            m[1].bias.uniform_(-0.5, 0.5)
        return m

    x, y = _data()
    reference = net()
    F.cross_entropy(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()

    model = convert_sync_batchnorm(net(), torch.device("cpu"))
    assert isinstance(model[1], CPUSyncBatchNorm)
    ddp = nn.parallel.DistributedDataParallel(model)
    share = GLOBAL_BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    F.cross_entropy(ddp(x[mine]), y[mine]).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return {"state_diff": _max_diff(model.state_dict(), reference.state_dict())}


def accumulation(rank: int, world: int) -> dict[str, float]:
    from engine.loop import backward_accumulated, split_batch

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 16), nn.ReLU(), nn.Linear(16, 3))

    x, y = _data()
    reference = net()
    F.cross_entropy(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()

    split = split_batch(GLOBAL_BATCH, world, max_per_process=2)
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    start = rank * split.per_process
    micro = [(x[i:i + split.micro_batch], y[i:i + split.micro_batch])
             for i in range(start, start + split.per_process, split.micro_batch)]
    assert len(micro) == split.accumulation > 1
    backward_accumulated(ddp, micro, lambda b: F.cross_entropy(ddp(b[0]), b[1]), distributed=True)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {"state_diff": _max_diff(model.state_dict(), reference.state_dict()),
            "rank_spread": max(float((g - gathered[0]).abs().max()) for g in gathered),
            "accumulation": split.accumulation}


def validation(rank: int, world: int, beton: str) -> dict[str, float]:
    from backbone.data import make_val_loader
    from backbone.evaluate import evaluate_classifier

    cpu = torch.device("cpu")
    loader = make_val_loader(beton, batch_size=5, num_workers=1, resolution=16, device=cpu, distributed=True,
                             dtype=torch.float32)
    labels = [int(y) for _, batch in loader for y in batch]
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 16, 16))
    scores = evaluate_classifier(model, loader, cpu, flip=False)
    return {"images": scores["images"], "labels_seen": len(labels)}


SCENARIOS = {"syncbn": syncbn, "accumulation": accumulation, "validation": validation}


def main() -> None:
    scenario, out, *args = sys.argv[1:]
    out = Path(out)
    dist.init_process_group("gloo")  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = SCENARIOS[scenario](rank, world, *args)
        gc.collect()  # DDP's reducer gone before its group: torn down the other way round, gloo can abort at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (out / f"{scenario}_{rank}.json").write_text(json.dumps({"world": world, "pid": os.getpid(), **result}))


if __name__ == "__main__":
    main()
