"""One rank of test_beton.py's 2-process gloo group: builds the train and val loaders and writes their sample
orders.

    python -m children.loader_rank BETON OUT_JSON      (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from backbone.data import make_train_loader, make_val_loader

beton, out = sys.argv[1:3]
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
cpu = torch.device("cpu")
train = make_train_loader(beton, batch_size=16, num_workers=1, resolution=24, device=cpu,
                          distributed=True, seed=3, drop_last=False)
val = make_val_loader(beton, batch_size=16, num_workers=1, resolution=24, device=cpu, distributed=True)
result = {"train": [train.traversal_order.sample_order(e).tolist() for e in (0, 1)],
          "val": val.traversal_order.sample_order(0).tolist()}
with open(out, "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
