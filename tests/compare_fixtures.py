"""The comparison's test data: a tiny shapes data set in the real on-disk layouts (ImageNet .beton files, VOCdevkit,
SBD) and the overrides that cut the comparison to a few steps per stage on it."""
from __future__ import annotations

from pathlib import Path

from experiments.shapes import ShapesSpec, write_shapes

TINY_SPEC = ShapesSpec(seed=3, train_per_class=8, val_per_class=3, voc_train=6, voc_val=5, sbd=12,
                       min_size=48, max_size=56)


def write_shapes_data(data: Path) -> dict[str, Path]:
    """The shapes data set under ``data`` and its .beton files."""
    from backbone.write_beton import WriterSettings, write_beton

    write_shapes(data, TINY_SPEC, progress=False)
    for split in ("train", "val"):
        write_beton(data / "imagenet" / split, data / f"{split}.beton", WriterSettings(max_resolution=64),
                    num_workers=1)
    return {"data": data, "train": data / "train.beton", "val": data / "val.beton",
            "voc": data / "VOCdevkit", "sbd": data / "benchmark_RELEASE"}


def _list(xs) -> str:
    return f"[{', '.join(str(x) for x in xs)}]"


def tiny_overrides(d: dict[str, Path], output: Path, backbones=("resnet10t", "resnet50_gcn"),
                   heads=("baseline", "gcn_br"), seeds=(0, 1), pretrain_seeds=(0,)) -> list[str]:
    """The comparison on ``d`` with the tiny CPU stage configs, a few steps each."""
    return [
        f"output={output}", f"backbones={_list(backbones)}", f"heads={_list(heads)}", f"seeds={_list(seeds)}",
        f"pretrain.seeds={_list(pretrain_seeds)}", "stats.replicates=500",
        "pretrain.config=configs/pretrain/tiny_cpu.yaml",
        f"pretrain.overrides=[data.train={d['train']}, data.val={d['val']}, train.epochs=1, data.global_batch=8, "
        "train.deterministic=false]",
        "finetune.config=configs/segmentation/tiny_cpu.yaml",
        f"finetune.overrides=[data.root={d['voc']}, data.sbd_root={d['sbd']}, data.train_split=train_aug, "
        "train.iterations=4, eval.every=0, run.checkpoint_every=2, train.deterministic=false]",
        "evaluate.boundary_width=2", "figures.figure6_images=3", "figures.vrf_images=2",
        "figures.vrf_scales=[1.0, 2.0]",
    ]
