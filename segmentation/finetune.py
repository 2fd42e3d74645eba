"""Fine-tune the GCN + BR network (or an ablation head) on PASCAL VOC 2012 + SBD or Cityscapes.

    python segmentation/finetune.py --backbone resnet50_gcn --head gcn_br \\
        --config configs/segmentation/voc_stage2.yaml --pretrained runs/pretrain/resnet50_gcn/final.pth \\
        data.root=/data/VOCdevkit data.sbd_root=/data/benchmark_RELEASE run.dir=runs/seg/voc_stage2

(also ``python -m segmentation.finetune ...``). The recipe: SGD with momentum, poly learning rate
``lr x (1 - it / iterations) ^ 0.9`` evaluated at every iteration, the new layers (GCN heads, BR
blocks, deconvolutions) at ``head_lr_mult`` x the backbone's lr, weight decay except on BN
parameters and biases, cross-entropy ignoring void (255), random scale / pad / crop / flip
augmentation, bf16 autocast and channels_last on GPU, DDP over torchrun or SLURM tasks.

The paper's staged training is a chain of runs: each stage's config names the previous stage's
``final.pth`` as ``model.init_from`` (whole-network weights) and its own data split and crop.

A run lives in ``run.dir`` exactly as a pretraining run does (backbone/common): ``config.yaml``,
``metrics.jsonl`` (train loss / lr / images per s, and val mIoU, pixel, boundary and internal
accuracy), ``train.log``, ``checkpoint_<iteration>.pt`` (every ``run.checkpoint_every`` iterations and
on SLURM's warning signal, then the job requeues itself) and, at the end, ``final.pth`` (weights and
what ``segmentation.evaluate`` needs). Starting again with the same directory resumes.
"""
from __future__ import annotations

import difflib
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __name__ == "__main__" and not __package__:
    # Run as a file: put the repository on sys.path *instead of* this folder, whose datasets.py,
    # metrics.py and transforms.py would otherwise shadow top-level modules of those names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import timm
import torch
import torch.nn.functional as F
from torch import nn

from backbone.common import checkpoint as ckpt
from backbone.common import distributed as distrib
from backbone.common.config import ConfigError, argument_parser, describe_keys, load_config, to_dict
from backbone.common.logs import MetricsWriter, Progress
from backbone.common.preemption import PreemptionFlag
from backbone.common.runner import NonFiniteLossError, run_stage
from backbone.weights import WeightsMismatchError, load_weights
from segmentation.datasets import (
    DATASETS,
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    build_samples,
    dataset_info,
)
from segmentation.evaluate import SEG_TRAIN_FORMAT, SEG_WEIGHTS_FORMAT, evaluate_dataset
from segmentation.heads import HEADS, make_score_head
from segmentation.network import build_segmentation_model
from segmentation.transforms import train_transform

log = logging.getLogger("segmentation.finetune")


# ---------------------------------------------------------------------------------------------
# Config schema
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    backbone: str = "resnet50_gcn"  # any timm CNN with a stride 4..32 feature pyramid
    head: str = "gcn_br"  # baseline, conv, stack, gcn, gcn_br
    kernel_size: int = 15  # k of the GCN / conv / stack heads
    pretrained: str = ""  # backbone weights: pretraining final.pth, "timm[:TAG]", or "" (random init)
    init_from: str = ""  # whole-network weights of a previous stage (its final.pth); overrides pretrained
    sync_bn: bool = True  # SyncBatchNorm across GPUs under DDP (small per-GPU batches)


@dataclass
class DataConfig:
    dataset: Literal["voc", "cityscapes"] = "voc"
    root: str = ""  # VOCdevkit, or the Cityscapes folder holding leftImg8bit/ and gtFine/
    sbd_root: str = ""  # benchmark_RELEASE (VOC train_aug and sbd_* splits)
    train_split: str = "train_aug"  # voc: train, trainval, train_aug, ...; cityscapes: train, train_coarse
    val_split: str = "val"
    crop_size: int = 512  # square training crops; smaller images are padded (mean pixel / void)
    scale_min: float = 0.5
    scale_max: float = 2.0
    hflip: bool = True
    batch_size: int = 8  # per process (per GPU)
    num_workers: int = 4  # DataLoader worker processes per GPU


@dataclass
class OptimConfig:
    lr: float = 0.01  # backbone lr at iteration 0 (poly decay to 0)
    head_lr_mult: float = 1.0  # lr multiplier of the new layers (heads, BR, deconvs); see docs: BN-free, >1 can diverge
    power: float = 0.9  # poly exponent
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not on BN parameters and biases


@dataclass
class TrainConfig:
    iterations: int = 30000  # optimiser steps; 0: use epochs
    epochs: float = 0.0  # used when iterations is 0: epochs x (images // global batch) steps
    amp: bool = True  # bf16 autocast on GPU (CPU runs stay fp32)
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class EvalConfig:
    every: int = 2000  # validate every N iterations (0: only at the end)
    max_images: int = 0  # validate on the first N images only (0: all)
    window: int = 0  # sliding-window size for big images (Cityscapes: 1024); 0: whole image
    overlap: float = 0.34  # share of a window overlapping its neighbour
    boundary_width: int = 5  # band w of boundary accuracy (segmentation.metrics)


@dataclass
class RunConfig:
    dir: str = ""  # run directory; default runs/finetune/<dataset>_<backbone>_<head>
    checkpoint_every: int = 1000  # iterations
    keep_checkpoints: int = 2
    log_every_s: float = 30.0
    check_every_steps: int = 20  # how often loss / signals are checked (each check syncs)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head={self.model.head!r} is not one of {', '.join(HEADS)}")
        if self.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset={self.data.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.train.iterations <= 0 and self.train.epochs <= 0:
            raise ConfigError("set train.iterations (or train.epochs with train.iterations=0)")
        for key, value in (("data.batch_size", self.data.batch_size), ("data.crop_size", self.data.crop_size),
                           ("run.checkpoint_every", self.run.checkpoint_every),
                           ("run.check_every_steps", self.run.check_every_steps)):
            if value < 1:
                raise ConfigError(f"{key} must be at least 1, not {value}")
        if not 0 < self.data.scale_min <= self.data.scale_max:
            raise ConfigError(f"need 0 < data.scale_min <= data.scale_max, got {self.data.scale_min}, "
                              f"{self.data.scale_max}")
        if not self.run.dir:
            self.run.dir = f"runs/finetune/{self.data.dataset}_{self.model.backbone}_{self.model.head}"


def model_args(cfg: FinetuneConfig) -> dict[str, Any]:
    """What rebuilds the network (``build_segmentation_model`` keywords)."""
    num_classes, _ = dataset_info(cfg.data.dataset)
    return {"backbone": cfg.model.backbone, "head": cfg.model.head, "num_classes": num_classes,
            "kernel_size": cfg.model.kernel_size}


def expected_identity(cfg: FinetuneConfig) -> dict[str, Any]:
    """What a checkpoint in ``run.dir`` must match to be resumed by this run."""
    # flat scalars: ckpt.peek_checkpoint reads those (and not nested dicts) without loading tensors
    return {"format": SEG_TRAIN_FORMAT, "dataset": cfg.data.dataset, **model_args(cfg)}


# ---------------------------------------------------------------------------------------------
# Schedule, parameter groups, sampling
# ---------------------------------------------------------------------------------------------
def poly_lr(base: float, it: int, total: int, power: float = 0.9) -> float:
    """``base x (1 - it / total) ^ power`` (0 from ``total`` on)."""
    return base * max(0.0, 1 - it / total) ** power


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not 0/0 = NaN) for a batch that is all void."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Backbone vs new layers (lr x head_lr_mult), each with and without weight decay (BN, biases)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((not name.startswith("encoder."), p.ndim <= 1), []).append(p)
    return [{"params": params, "lr_mult": cfg.head_lr_mult if head else 1.0,
             "weight_decay": 0.0 if no_decay else cfg.weight_decay, "name": ("head" if head else "backbone")
             + ("_no_decay" if no_decay else "")} for (head, no_decay), params in sorted(groups.items())]


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation per epoch, in whole batches, from any batch on.

    Yields ``(index, sample_seed)`` pairs: the sample's augmentation is seeded by (run seed, epoch,
    position), so a run resumed mid-epoch sees the very batches an uninterrupted run sees, whatever
    the number of loader workers.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world_size, seed
        self.steps_per_epoch = size // (batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps_per_epoch * self.batch_size * self.world]
        mine = list(range(self.rank, len(order), self.world))[self.start_step * self.batch_size:]
        base = (self.seed * 100_003 + self.epoch) * 10_000_019
        for pos in mine:
            yield int(order[pos]), (base + pos) % 2**63


# ---------------------------------------------------------------------------------------------
# Checks done before any worker starts
# ---------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    train: list
    val: list
    resume_from: Path | None
    already_finished: bool


def plan_run(cfg: FinetuneConfig) -> RunPlan:
    """Validate data, weights and the run directory; raise with the problem and the fix."""
    if not timm.is_model(cfg.model.backbone):
        close = difflib.get_close_matches(cfg.model.backbone, timm.list_models(), n=5)
        raise ConfigError(f"unknown backbone '{cfg.model.backbone}' (model.backbone / --backbone); close timm "
                          f"names: {', '.join(close) or 'none'}")
    try:
        with torch.device("meta"):  # a bad k fails here, before the run directory exists
            make_score_head(cfg.model.head, 1, 1, cfg.model.kernel_size)
    except ValueError as e:
        raise ConfigError(f"model.kernel_size={cfg.model.kernel_size}: {e}") from e
    d = cfg.data
    train = build_samples(d.dataset, d.train_split, d.root, d.sbd_root or None)
    val = build_samples(d.dataset, d.val_split, d.root, d.sbd_root or None)
    for key in ("pretrained", "init_from"):
        path = getattr(cfg.model, key)
        if path and not path.startswith("timm") and not Path(path).is_file():
            raise ConfigError(f"model.{key}: {path} does not exist")
    run_dir = Path(cfg.run.dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        ckpt.check_compatible(ckpt.peek_checkpoint(latest), latest, expected_identity(cfg))
    finished = (run_dir / "final.pth").exists()
    if finished and latest is None:
        raise ConfigError(f"{run_dir / 'final.pth'} exists without a checkpoint beside it: not a run directory "
                          "this trainer can resume; choose another run.dir")
    return RunPlan(train, val, latest, finished)


def build_model(cfg: FinetuneConfig) -> nn.Module:
    m = cfg.model
    pretrained = m.pretrained or None
    if m.init_from:
        pretrained = None  # the previous stage's weights replace the backbone's anyway
    model = build_segmentation_model(pretrained=pretrained, **model_args(cfg))
    if m.init_from:
        meta = load_weights(model, m.init_from, optional_prefixes=(), model_name=f"{m.backbone}+{m.head}")
        log.info("initialised the whole network from %s (%s)", m.init_from,
                 meta.get("format", "state dict"))
    return model


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Finetuner:
    def __init__(self, cfg: FinetuneConfig, plan: RunPlan, env: distrib.DistEnv, device: torch.device,
                 preempt: PreemptionFlag):
        self.cfg, self.plan, self.env, self.device, self.preempt = cfg, plan, env, device, preempt
        self.run_dir = Path(cfg.run.dir)
        self.on_gpu = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.on_gpu and cfg.train.amp else None
        self.memory_format = torch.channels_last if cfg.train.channels_last and self.on_gpu \
            else torch.contiguous_format
        self.num_classes, self.classes = dataset_info(cfg.data.dataset)

        torch.manual_seed(cfg.train.seed)  # the same new-layer initialisation on every rank
        model = build_model(cfg)
        if env.distributed and self.on_gpu and cfg.model.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device, memory_format=self.memory_format)
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[device] if self.on_gpu else None)
                    if env.distributed else self.model)
        self.optimizer = torch.optim.SGD(param_groups(self.model, cfg.optim), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum)

        d = cfg.data
        self.train_set = SegmentationDataset(plan.train, self.num_classes, train_transform(
            d.crop_size, (d.scale_min, d.scale_max), d.hflip))
        self.val_set = SegmentationDataset(plan.val, self.num_classes)
        self.sampler = EpochSampler(len(self.train_set), d.batch_size, env.rank, env.world_size, cfg.train.seed)
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(f"{d.dataset}/{d.train_split} has {len(self.train_set)} images, fewer than one "
                              f"global batch ({d.batch_size} x {env.world_size} processes): lower data.batch_size")
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.num_workers,
            pin_memory=self.on_gpu, persistent_workers=d.num_workers > 0, drop_last=True,
            generator=torch.Generator().manual_seed(cfg.train.seed))  # not the global RNG
        self.global_batch = d.batch_size * env.world_size
        self.total = cfg.train.iterations or max(1, round(cfg.train.epochs * self.sampler.steps_per_epoch))

        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.last_val: dict[str, Any] = {}
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=env.is_main)
        if plan.resume_from is not None:
            self.resume(plan.resume_from)

    # --- checkpoints --------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {**expected_identity(self.cfg), "model_args": model_args(self.cfg), "classes": list(self.classes),
                "config": to_dict(self.cfg)}

    def save(self) -> None:
        rng = [None] * self.env.world_size
        if distrib.is_initialized():
            torch.distributed.all_gather_object(rng, ckpt.capture_rng_state())
        else:
            rng = [ckpt.capture_rng_state()]
        if self.env.is_main:
            state = {**self.meta(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                     "total_steps": self.total, "global_batch": self.global_batch,
                     "world_size": self.env.world_size, "rng": rng, "last_val": self.last_val}
            path = ckpt.save_checkpoint(state, self.run_dir, self.step, keep=self.cfg.run.keep_checkpoints)
            log.info("checkpoint: %s (iteration %d/%d)", path, self.step, self.total)
        distrib.barrier()

    def resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, expected_identity(self.cfg))
        if state["global_batch"] != self.global_batch or state["total_steps"] != self.total:
            raise ckpt.CheckpointError(
                f"{path} was trained with a global batch of {state['global_batch']} for {state['total_steps']} "
                f"iterations; this run has {self.global_batch} (data.batch_size x {self.env.world_size} "
                f"processes) for {self.total}: resume with the same settings, or use another run.dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.last_val = state.get("last_val", {})
        if len(state["rng"]) == self.env.world_size:
            ckpt.restore_rng_state(state["rng"][self.env.rank])
        log.info("resumed from checkpoint %s at iteration %d/%d (epoch %d)", path, self.step, self.total,
                 self.epoch)

    def write_final(self) -> Path:
        sd = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
              for k, v in self.model.state_dict().items()}
        final = {**self.meta(), "format": SEG_WEIGHTS_FORMAT, "state_dict": sd, "iterations": self.step,
                 "val": self.last_val}
        path = self.run_dir / "final.pth"
        ckpt.save_atomic(final, path)
        return path

    # --- loops --------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches across epochs, from where the run stands (epoch, batch within it)."""
        while True:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            yield from self.loader
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def fit(self) -> str:
        """Train to the end (``'finished'``) or until a signal (``'preempted'``)."""
        cfg = self.cfg
        if self.env.is_main:
            log.info("fine-tuning %s + %s on %s/%s (%d images): %d iterations, global batch %d (%d processes), "
                     "%d iterations per epoch, lr %.4g (new layers x%g)", cfg.model.backbone, cfg.model.head,
                     cfg.data.dataset, cfg.data.train_split, len(self.train_set), self.total, self.global_batch,
                     self.env.world_size, self.sampler.steps_per_epoch, cfg.optim.lr, cfg.optim.head_lr_mult)
        if self.step >= self.total:
            return "finished"
        self.model.train()
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        loss_sum = torch.zeros((), device=self.device)
        n_logged, t0, images_seen = 0, time.perf_counter(), 0
        remaining = itertools.islice(self.batches(), self.total - self.step)
        progress = Progress(remaining, self.total, "fine-tune", enabled=self.env.is_main,
                            every_s=cfg.run.log_every_s, logger=log, initial=self.step)
        for images, masks in progress:
            lr = poly_lr(cfg.optim.lr, self.step, self.total, cfg.optim.power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            masks = masks.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.ddp(images)
            loss = segmentation_loss(logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
            loss = loss.detach()
            bad |= ~torch.isfinite(loss)
            loss_sum += loss
            n_logged += 1
            images_seen += images.shape[0]

            last = self.step == self.total
            # A signal may reach the ranks at different steps: they agree through an all-reduce,
            # which syncs, so multi-process runs look only every check_every_steps steps.
            periodic = self.step % cfg.run.check_every_steps == 0 or last
            stop = distrib.any_rank(bool(self.preempt), self.device) if periodic or not self.env.distributed \
                else False
            if periodic or stop:
                if distrib.any_rank(bool(bad.item()), self.device):
                    raise NonFiniteLossError(
                        f"non-finite training loss before iteration {self.step}; the run stopped without writing a "
                        f"new checkpoint. Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}. "
                        "Lower optim.lr (or optim.head_lr_mult) or check the data, then start again with the same "
                        "run.dir to resume from it.")
                now = time.perf_counter()
                rate = images_seen * self.env.world_size / max(now - t0, 1e-9)
                mean_loss = (distrib.all_reduce_sum(loss_sum.clone()) / (n_logged * self.env.world_size)).item()
                progress.update(loss=mean_loss, lr=lr, epoch=self.epoch + 1, img_s=round(rate, 1))
                self.metrics.write(kind="train", epoch=self.epoch, step=self.step, loss=mean_loss, lr=lr,
                                   images_per_s=rate)
                loss_sum.zero_()
                n_logged, t0, images_seen = 0, now, 0
            if stop and not last:  # on the last iteration finishing is quicker than a requeue
                self.save()
                self.preempt.hand_over(self.env.is_main)
                return "preempted"
            if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                self.validate()
            if last or self.step % cfg.run.checkpoint_every == 0:
                self.save()
        return "finished"

    def validate(self) -> dict[str, Any]:
        e = self.cfg.eval
        scores = evaluate_dataset(self.model, self.val_set, self.device, window=e.window, overlap=e.overlap,
                                  boundary_width=e.boundary_width, amp_dtype=self.amp_dtype,
                                  memory_format=self.memory_format, max_images=e.max_images, env=self.env,
                                  progress_every_s=self.cfg.run.log_every_s)
        self.last_val = {k: v for k, v in scores.items()}
        self.metrics.write(kind="val", epoch=self.epoch, step=self.step, split=self.cfg.data.val_split, **scores)
        if self.env.is_main:
            log.info("iteration %d/%d: val mIoU %.2f%%, pixel acc. %.2f%%, boundary acc. %.2f%%, internal acc. "
                     "%.2f%% (%d images)", self.step, self.total, 100 * scores["miou"], 100 * scores["pixel_acc"],
                     100 * scores["boundary_acc"], 100 * scores["internal_acc"], scores["images"])
        self.model.train()
        return scores


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, preempt: PreemptionFlag | None = None) -> str:
    """Fine-tune (or resume) the run of ``cfg``; returns 'finished', 'preempted' or 'done before'."""
    plan = plan_run(cfg)  # every rank checks; errors before any worker exists
    return run_stage(cfg, plan, lambda env, device, flag: Finetuner(cfg, plan, env, device, flag), preempt)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path | None, list[str]]:
    parser = argument_parser(
        "Fine-tune the GCN + BR segmentation network on PASCAL VOC (+SBD) or Cityscapes (DDP, resumable).",
        prog="python segmentation/finetune.py",
        epilog="config keys (section.key=default):\n" + describe_keys(FinetuneConfig))
    parser.add_argument("--backbone", help="timm backbone (model.backbone), e.g. resnet50 or resnet50_gcn")
    parser.add_argument("--head", choices=HEADS, help="score-map head (model.head)")
    parser.add_argument("--pretrained", help="backbone weights (model.pretrained): pretraining final.pth or timm[:TAG]")
    args = parser.parse_args(argv)
    overrides = [f"model.{k}={v}" for k in ("backbone", "head", "pretrained") if (v := getattr(args, k))]
    return args.config, overrides + list(args.overrides)  # explicit key=value arguments win


def main(argv: Sequence[str] | None = None) -> int:
    config, overrides = parse_args(argv)
    try:
        cfg = load_config(FinetuneConfig, config, overrides)
        status = run(cfg)
    except (ConfigError, DatasetError, ckpt.CheckpointError, WeightsMismatchError, NonFiniteLossError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if status in ("finished", "done before", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
