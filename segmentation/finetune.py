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

import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __name__ == "__main__" and not __package__:
    # Run as a file: put the repository on sys.path *instead of* this folder, whose datasets.py,
    # metrics.py and transforms.py would otherwise shadow top-level modules of those names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from torch import nn

from backbone.antialias import AUTO, blurred_convs
from backbone.weights import WeightsMismatchError, load_weights, read_state_dict
from engine import checkpoint as ckpt
from engine import distributed as distrib
from engine.batchnorm import SYNCED, convert_sync_batchnorm
from engine.complexity import TrainFlops
from engine.config import (
    ConfigError,
    argument_parser,
    check_ranges,
    describe_keys,
    load_config,
    require_file,
    to_dict,
)
from engine.curves import draw_curves
from engine.logs import MetricsWriter
from engine.loop import MicroBatches, TrainLoop, autocast, backward_accumulated, split_batch
from engine.preemption import PreemptionFlag
from engine.provenance import file_sha256, read_run_record
from engine.runner import NonFiniteLossError, RunDirState, RunStatus, inspect_run_dir, run_cli, run_stage
from segmentation.artifacts import FinetuneCheckpoint, FinetuneWeights, identity
from segmentation.datasets import (
    DATASETS,
    IGNORE_INDEX,
    DatasetError,
    Sample,
    SegmentationDataset,
    build_samples,
    dataset_info,
)
from segmentation.evaluate import evaluate_dataset
from segmentation.heads import HEADS, make_score_head
from segmentation.network import build_segmentation_model, check_backbone
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
    # the backbone's anti-aliasing: auto = as the weights were trained (none for random init)
    anti_aliasing: Literal["auto", "blurpool", "none"] = "auto"
    sync_bn: bool = True  # BatchNorm statistics over all processes under DDP (small per-GPU batches)


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
    global_batch: int = 64  # images per optimiser step over all processes (the recipe's batch)
    max_batch_per_process: int = 0  # a process holding more accumulates gradients over micro-batches; 0: no limit
    num_workers: int = 4  # DataLoader worker processes per GPU

    RENAMED = {"batch_size": "the recipe now states the batch over all processes: data.global_batch (e.g. 8 per "
                             "GPU on 8 GPUs is data.global_batch=64)"}


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
    preempt_at_step: int = 0  # rehearsals: act as if SLURM's warning signal came at this step (once); 0: never


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # Keys that cannot change the trained network: paths (the weights it starts from are identified by
    # content in run.json), machine settings, logging. Everything else is the recipe.
    NOT_RECIPE = ("model.pretrained", "model.init_from", "data.root", "data.sbd_root", "data.num_workers",
                  "train.device", "train.deterministic", "eval.every", "run.dir", "run.keep_checkpoints",
                  "run.log_every_s", "run.check_every_steps", "run.preempt_at_step")

    # Every number's valid range, checked before anything runs (a negative lr would train by gradient ascent).
    RANGES = {"model.kernel_size": ">= 1", "data.crop_size": ">= 1", "data.global_batch": ">= 1",
              "data.max_batch_per_process": ">= 0", "data.num_workers": ">= 0", "optim.lr": "> 0",
              "optim.head_lr_mult": ">= 0", "optim.power": ">= 0", "optim.momentum": "[0, 1)",
              "optim.weight_decay": ">= 0", "train.iterations": ">= 0", "train.epochs": ">= 0", "eval.every": ">= 0",
              "eval.max_images": ">= 0", "eval.window": ">= 0", "eval.overlap": "[0, 1)", "eval.boundary_width": ">= 0",
              "run.checkpoint_every": ">= 1", "run.keep_checkpoints": ">= 0", "run.log_every_s": "> 0",
              "run.check_every_steps": ">= 1", "run.preempt_at_step": ">= 0"}

    def validate(self) -> None:
        check_ranges(self, self.RANGES)
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head={self.model.head!r} is not one of {', '.join(HEADS)}")
        if self.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset={self.data.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.train.iterations <= 0 and self.train.epochs <= 0:
            raise ConfigError("set train.iterations (or train.epochs with train.iterations=0)")
        if not 0 < self.data.scale_min <= self.data.scale_max:
            raise ConfigError(f"need 0 < data.scale_min <= data.scale_max, got {self.data.scale_min}, "
                              f"{self.data.scale_max}")
        if not self.run.dir:
            self.run.dir = f"runs/finetune/{self.data.dataset}_{self.model.backbone}_{self.model.head}"


def model_args(cfg: FinetuneConfig, anti_aliasing: str | None) -> dict[str, Any]:
    """What rebuilds the network (``build_segmentation_model`` keywords); ``anti_aliasing`` as resolved by
    :func:`resolve_anti_aliasing`."""
    num_classes, _ = dataset_info(cfg.data.dataset)
    return {"backbone": cfg.model.backbone, "head": cfg.model.head, "num_classes": num_classes,
            "kernel_size": cfg.model.kernel_size, "anti_aliasing": anti_aliasing}


def resolve_anti_aliasing(cfg: FinetuneConfig) -> str | None:
    """The backbone's anti-aliasing: what the weights this run starts from were trained with, checked
    against ``model.anti_aliasing`` (``auto`` follows them)."""
    m = cfg.model
    asked = {"none": None}.get(m.anti_aliasing, m.anti_aliasing)
    if m.init_from:
        trained = read_state_dict(m.init_from)[1].get("model_args", {}).get("anti_aliasing")
    elif m.pretrained and not m.pretrained.startswith("timm"):
        trained = "blurpool" if blurred_convs(read_state_dict(m.pretrained)[0]) else None
    else:  # random init or timm's weights: as asked
        return None if asked == AUTO else asked
    if asked not in (AUTO, trained):
        raise ConfigError(f"model.anti_aliasing={m.anti_aliasing} but {m.init_from or m.pretrained} was trained with "
                          f"anti_aliasing={trained}: use model.anti_aliasing=auto to follow the weights")
    return trained


def expected_identity(cfg: FinetuneConfig, anti_aliasing: str | None) -> dict[str, Any]:
    """What a checkpoint in ``run.dir`` must match to be resumed by this run."""
    return identity(cfg.data.dataset, model_args(cfg, anti_aliasing))


# ---------------------------------------------------------------------------------------------
# Schedule, parameter groups, sampling
# ---------------------------------------------------------------------------------------------
def planned_iterations(cfg: FinetuneConfig, images: int) -> int:
    """The run's optimiser steps: ``train.iterations``, or ``train.epochs`` x the whole global batches per epoch."""
    return cfg.train.iterations or max(1, round(cfg.train.epochs * (images // cfg.data.global_batch)))


def poly_lr(base: float, it: int, total: int, power: float = 0.9) -> float:
    """``base x (1 - it / total) ^ power`` (0 from ``total`` on)."""
    return base * max(0.0, 1 - it / total) ** power


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not 0/0 = NaN) for a batch that is all void.

    CUDA has no deterministic kernel for the 2-D ``nll_loss`` that ``cross_entropy`` uses on score maps;
    in deterministic mode on a GPU (or with ``deterministic=True``) the same sum is taken as
    ``-(log_softmax * one_hot)``, whose backward is deterministic.
    """
    labelled = masks != IGNORE_INDEX
    if deterministic is None:
        deterministic = logits.is_cuda and torch.are_deterministic_algorithms_enabled()
    if deterministic:
        log_p = logits.float().log_softmax(1)
        target = F.one_hot(masks.where(labelled, 0), logits.shape[1]).permute(0, 3, 1, 2).to(log_p.dtype)
        total = -(log_p * target).sum(1)[labelled].sum()
    else:
        total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.sum().clamp(min=1)


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
class FinetuneInputs:
    """What the checks found: the training and validation samples and the state of the run directory."""

    train: list[Sample]
    val: list[Sample]
    anti_aliasing: str | None  # the backbone's, resolved from the weights the run starts from
    run: RunDirState


def check_inputs(cfg: FinetuneConfig) -> FinetuneInputs:
    """Validate data, weights and the run directory; raise with the problem and the fix."""
    check_backbone(cfg.model.backbone, "model.backbone / --backbone")
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
        if path and not path.startswith("timm"):
            require_file(path, f"model.{key}", "give the final.pth of a pretraining (pretrained) or fine-tuning "
                                               "(init_from) run")
    try:
        anti_aliasing = resolve_anti_aliasing(cfg)
    except WeightsMismatchError as e:
        raise ConfigError(str(e)) from e
    state = inspect_run_dir(cfg.run.dir, expected_identity(cfg, anti_aliasing))
    return FinetuneInputs(train, val, anti_aliasing, state)


def build_model(cfg: FinetuneConfig, anti_aliasing: str | None = AUTO) -> nn.Module:
    """The network of ``cfg`` with the weights it starts from; ``anti_aliasing`` as resolved (default: resolve it)."""
    if anti_aliasing == AUTO:
        anti_aliasing = resolve_anti_aliasing(cfg)
    m = cfg.model
    pretrained = m.pretrained or None
    if m.init_from:
        pretrained = None  # the previous stage's weights replace the backbone's anyway
    model = build_segmentation_model(pretrained=pretrained, **model_args(cfg, anti_aliasing))
    if m.init_from:
        meta = load_weights(model, m.init_from, optional_prefixes=(), model_name=f"{m.backbone}+{m.head}")
        log.info("initialised the whole network from %s (%s)", m.init_from,
                 meta.get("format", "state dict"))
    return model


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Finetuner:
    def __init__(self, cfg: FinetuneConfig, inputs: FinetuneInputs, env: distrib.DistEnv, device: torch.device,
                 preempt: PreemptionFlag):
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = Path(cfg.run.dir)
        self.on_gpu = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.on_gpu and cfg.train.amp else None
        self.memory_format = torch.channels_last if cfg.train.channels_last and self.on_gpu \
            else torch.contiguous_format
        self.num_classes, self.classes = dataset_info(cfg.data.dataset)

        torch.manual_seed(cfg.train.seed)  # the same new-layer initialisation on every rank
        self.model_args = model_args(cfg, inputs.anti_aliasing)
        model = build_model(cfg, inputs.anti_aliasing)
        if env.distributed and cfg.model.sync_bn:  # torch's SyncBatchNorm on GPUs, the same statistics on CPUs
            model = convert_sync_batchnorm(model, device)
            log.info("BatchNorm over all %d processes: %d SyncBatchNorm layers (%s)", env.world_size,
                     sum(isinstance(m, SYNCED) for m in model.modules()), type(next(
                         m for m in model.modules() if isinstance(m, SYNCED))).__name__ if any(
                         isinstance(m, SYNCED) for m in model.modules()) else "none")
        self.model = model.to(device, memory_format=self.memory_format)
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[device] if self.on_gpu else None)
                    if env.distributed else self.model)
        self.optimizer = torch.optim.SGD(param_groups(self.model, cfg.optim), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum)

        d = cfg.data
        self.train_set = SegmentationDataset(inputs.train, self.num_classes, train_transform(
            d.crop_size, (d.scale_min, d.scale_max), d.hflip, model.normalization))
        self.val_set = SegmentationDataset(inputs.val, self.num_classes)
        self.batch = split_batch(d.global_batch, env.world_size, d.max_batch_per_process)
        self.sampler = EpochSampler(len(self.train_set), self.batch.per_process, env.rank, env.world_size,
                                    cfg.train.seed)
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(f"{d.dataset}/{d.train_split} has {len(self.train_set)} images, fewer than one "
                              f"global batch (data.global_batch={d.global_batch}): lower it")
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch.micro_batch, sampler=self.sampler, num_workers=d.num_workers,
            pin_memory=self.on_gpu, persistent_workers=d.num_workers > 0, drop_last=True,
            generator=torch.Generator().manual_seed(cfg.train.seed))  # not the global RNG
        self.global_batch = d.global_batch
        self.total = planned_iterations(cfg, len(self.train_set))

        self.epoch, self.step_in_epoch = 0, 0
        self.last_val: dict[str, Any] = {}
        self.flops = TrainFlops(self.model)
        self.loop = TrainLoop(
            env=env, device=device, preempt=preempt,
            metrics=MetricsWriter(self.run_dir / "metrics.jsonl", enabled=env.is_main,
                                  names={"per_class_iou": list(self.classes)}), logger=log,
            flops_per_image=lambda: self.flops(3, d.crop_size, d.crop_size),
            models=[self.model], checkpoint_state=self.checkpoint_state, run_dir=self.run_dir,
            keep_checkpoints=cfg.run.keep_checkpoints,
            total_steps=self.total, check_every=cfg.run.check_every_steps,
            checkpoint_every=cfg.run.checkpoint_every, log_every_s=cfg.run.log_every_s,
            preempt_at_step=cfg.run.preempt_at_step,
            nonfinite_hint="Lower optim.lr (or optim.head_lr_mult) or check the data")
        if inputs.run.resume_from is not None:
            self.resume(inputs.run.resume_from)

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return FinetuneCheckpoint(
            dataset=self.cfg.data.dataset, model_args=self.model_args, classes=list(self.classes),
            config=to_dict(self.cfg), model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            step=self.loop.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch, total_steps=self.total,
            global_batch=self.global_batch, world_size=self.env.world_size, rng=rng, last_val=self.last_val,
        ).to_dict()

    def resume(self, path: Path) -> None:
        # trained with the same global batch, world size and iterations: checked before the run started (run)
        state = FinetuneCheckpoint.load(path, identity(self.cfg.data.dataset, self.model_args))
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.loop.step, self.epoch, self.step_in_epoch = state.step, state.epoch, state.step_in_epoch
        self.last_val = state.last_val
        ckpt.restore_rank_rng(state.rng, self.env.rank, self.env.world_size)
        log.info("resumed from checkpoint %s at iteration %d/%d (epoch %d)", path, state.step, self.total,
                 self.epoch)

    def write_final(self) -> Path:
        final = FinetuneWeights(dataset=self.cfg.data.dataset, model_args=self.model_args,
                                classes=list(self.classes), config=to_dict(self.cfg),
                                state_dict=ckpt.export_weights(self.model), iterations=self.loop.step,
                                normalization=[list(v) for v in self.model.normalization], val=self.last_val,
                                provenance=read_run_record(self.run_dir))
        return final.save(self.run_dir / "final.pth")

    # --- loops --------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches across epochs, from where the run stands (epoch, step within it: :meth:`count_step`
        moves it on, so that an epoch asked for after its last step starts the next one)."""
        while True:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            yield from self.loader

    def count_step(self) -> None:
        """One optimiser step done: the position in the epoch (what a checkpoint records) moves on."""
        self.step_in_epoch += 1
        if self.step_in_epoch == self.sampler.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        masks = masks.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            logits = self.ddp(images)
        return segmentation_loss(logits, masks)

    def fit(self) -> RunStatus:
        """Train to the end, or until a signal (then a checkpoint is on disk and the job requeued)."""
        cfg = self.cfg
        if self.env.is_main:
            b = self.batch
            accumulated = f" (accumulated over {b.accumulation} micro-batches of {b.micro_batch})" \
                if b.accumulation > 1 else ""
            log.info("fine-tuning %s + %s on %s/%s (%d images): %d iterations, global batch %d (%d processes) of %d "
                     "per process%s, %d iterations per epoch, lr %.4g (new layers x%g)", cfg.model.backbone,
                     cfg.model.head, cfg.data.dataset, cfg.data.train_split, len(self.train_set), self.total,
                     self.global_batch, self.env.world_size, b.per_process, accumulated, self.sampler.steps_per_epoch,
                     cfg.optim.lr, cfg.optim.head_lr_mult)
        self.model.train()
        try:
            self.train_iterations()
        finally:
            self.loop.metrics.flush()
        return RunStatus.PREEMPTED if self.loop.preempted else RunStatus.FINISHED

    def train_iterations(self) -> None:
        """The loop, as torchvision's ``train_one_epoch`` reads, over the run's remaining iterations."""
        cfg = self.cfg
        start = self.loop.step
        for micro_batches in self.loop.steps(self.batches(), accumulation=self.batch.accumulation,
                                             length=self.total - start, total=self.total, initial=start,
                                             desc="fine-tune"):
            lr = poly_lr(cfg.optim.lr, self.loop.step, self.total, cfg.optim.power)
            epoch = self.epoch
            loss = self.train_step(micro_batches, lr)
            self.count_step()
            self.loop.record(loss, self.batch.per_process, epoch=epoch, lr=lr)
            step = self.loop.step + 1
            if step == self.total or (cfg.eval.every and step % cfg.eval.every == 0):
                self.validate(step)

    def train_step(self, micro_batches: MicroBatches, lr: float) -> torch.Tensor:
        """One optimiser step over this process's share of the global batch (its micro-batches)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = backward_accumulated(self.ddp, micro_batches, self.loss, self.env.distributed)
        self.optimizer.step()
        return loss

    def validate(self, step: int) -> dict[str, Any]:
        e = self.cfg.eval
        scores = evaluate_dataset(self.model, self.val_set, self.device, window=e.window, overlap=e.overlap,
                                  boundary_width=e.boundary_width, amp_dtype=self.amp_dtype,
                                  memory_format=self.memory_format, max_images=e.max_images, env=self.env,
                                  progress_every_s=self.cfg.run.log_every_s, num_workers=self.cfg.data.num_workers,
                                  per_image=False)
        self.last_val = dict(scores)
        self.loop.metrics.write(kind="val", epoch=self.epoch, step=step, split=self.cfg.data.val_split, **scores)
        self.loop.check_validation(0.0 if scores["nonfinite_images"] == 0 else math.nan,
                                   f"network output on {scores['nonfinite_images']} validation image(s)")
        if self.env.is_main:  # curves.png, redrawn from metrics.jsonl
            self.loop.metrics.flush()
            draw_curves({f"{self.cfg.model.backbone} + {self.cfg.model.head}": self.run_dir},
                        self.run_dir / "curves.png", f"fine-tuning ({self.run_dir.name})")
        if self.env.is_main:
            log.info("iteration %d/%d: val mIoU %.2f%%, pixel acc. %.2f%%, boundary acc. %.2f%%, internal acc. "
                     "%.2f%% (%d images)", step, self.total, 100 * scores["miou"], 100 * scores["pixel_acc"],
                     100 * scores["boundary_acc"], 100 * scores["internal_acc"], scores["images"])
        self.model.train()
        return scores


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, preempt: PreemptionFlag | None = None) -> RunStatus:
    """Fine-tune (or resume) the run of ``cfg``."""
    inputs = check_inputs(cfg)  # every rank checks; errors before any worker exists
    return run_stage(cfg, inputs.run, lambda env, device, flag: Finetuner(cfg, inputs, env, device, flag), preempt,
                     provenance=provenance_of(cfg, inputs),
                     resume_settings={"global_batch": cfg.data.global_batch,
                                      "total_steps": planned_iterations(cfg, len(inputs.train))})


def provenance_of(cfg: FinetuneConfig, inputs: FinetuneInputs) -> dict[str, Any]:
    """What run.json records beyond the recipe: the weights the run starts from (by content), the data."""
    record: dict[str, Any] = {"global_batch": cfg.data.global_batch,
                              "data": {"dataset": cfg.data.dataset, "root": str(Path(cfg.data.root).resolve()),
                                       "train_images": len(inputs.train), "val_images": len(inputs.val)}}
    for key in ("pretrained", "init_from"):
        path = getattr(cfg.model, key)
        if path and not path.startswith("timm"):
            record[key] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
        elif path:
            record[key] = {"timm": path}
    return record


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
    return run_cli(lambda: load_config(FinetuneConfig, config, overrides), run,
                   (ConfigError, DatasetError, ckpt.CheckpointError, WeightsMismatchError, NonFiniteLossError,
                    FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
