"""ImageNet pretraining of any timm model with ffcv, DDP and preemption-safe checkpoints.

    python -m backbone.train --config configs/pretrain/resnet50_gcn_88_epochs.yaml \\
        data.train=/data/ffcv/train.beton data.val=/data/ffcv/val.beton run.dir=runs/r50gcn_88

The recipe is ffcv-imagenet's ResNet-50 one: SGD (momentum 0.9, no weight decay on BN and
biases), label smoothing, a triangular (or step) lr schedule evaluated at every iteration,
progressive resizing 160 -> 192 px, evaluation at 256 px of a 224/256 centre crop with flip
averaging, optional BlurPool, bf16 autocast and channels_last on GPU. Both Table 6 backbones
(``resnet50`` and ``resnet50_gcn``) go through this same code.

A run lives in one directory (``run.dir``): ``config.yaml`` (resolved config), ``metrics.jsonl``,
``train.log``, ``checkpoint_<step>.pt`` (every epoch and on SLURM's warning signal) and, at the
end, ``final.pth`` (weights only, EMA if used) that timm and the segmentation stage load.
Starting again with the same directory resumes from the latest checkpoint.
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

import backbone  # noqa: F401  (registers resnet50_gcn with timm)
from backbone.common import checkpoint as ckpt
from backbone.common import distributed as distrib
from backbone.common.config import (
    ConfigError,
    argument_parser,
    describe_keys,
    load_config,
    to_dict,
)
from backbone.common.logs import MetricsWriter, Progress
from backbone.common.preemption import PreemptionFlag
from backbone.common.runner import NonFiniteLossError, run_stage

log = logging.getLogger("backbone.train")

TRAIN_FORMAT = "lkm-train-v1"
WEIGHTS_FORMAT = "lkm-weights-v1"
VAL_CROP_RATIO = 224 / 256


# ---------------------------------------------------------------------------------------------
# Config schema (sections as in ffcv-imagenet's YAML files)
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "resnet50"  # any timm model name; resnet50_gcn after `import backbone`
    blurpool: bool = True  # timm aa_layer=BlurPool2d (anti-aliased stride-2 convs), as ffcv-imagenet
    num_classes: int | None = None  # None: the class count of the training .beton


@dataclass
class DataConfig:
    train: str = ""  # training .beton (python -m backbone.write_beton)
    val: str = ""  # validation .beton
    batch_size: int = 512  # per process (per GPU); the global batch is batch_size x world size
    val_batch_size: int = 256  # per process
    num_workers: int = 12  # ffcv decoding threads per process
    in_memory: bool = True  # ffcv os_cache: keep the .beton in the page cache


@dataclass
class OptimConfig:
    lr: float = 1.7  # peak lr at a global batch of lr_batch_size, scaled linearly to the actual one
    lr_batch_size: int = 4096
    schedule: Literal["triangular", "step"] = "triangular"
    lr_peak_epoch: float = 2.0  # triangular: linear warm-up to the peak, then linear to 0
    step_ratio: float = 0.1  # step: lr x step_ratio every step_length epochs
    step_length: int = 30
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to BN parameters and biases
    label_smoothing: float = 0.1


@dataclass
class ResolutionConfig:
    min_res: int = 160  # training resolution up to start_ramp
    max_res: int = 192  # from end_ramp on
    start_ramp: int = 65  # ffcv-imagenet's 88-epoch values
    end_ramp: int = 76
    round_to: int = 32  # intermediate resolutions are rounded to multiples of this
    val_res: int = 256  # evaluation: centre crop of 224/256 of the short side, resized to this


@dataclass
class TrainConfig:
    epochs: int = 88
    eval_every: int = 1  # evaluate every N epochs (and always after the last one)
    flip_tta: bool = True  # evaluation averages the logits of the image and its mirror
    amp: bool = True  # bf16 autocast on GPU (CPU runs stay fp32)
    channels_last: bool = True
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3); final.pth then holds the EMA
    ema_decay: float = 0.9999
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower); used by the resume test
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class RunConfig:
    dir: str = ""  # run directory; default runs/pretrain/<model name>
    keep_checkpoints: int = 2
    log_every_s: float = 30.0  # one-line progress summary period when not on a terminal
    check_every_steps: int = 50  # how often the loss is checked for NaN/inf (each check syncs)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if not self.run.dir:
            self.run.dir = f"runs/pretrain/{self.model.name}"
        for key, value in (("data.batch_size", self.data.batch_size), ("train.epochs", self.train.epochs),
                           ("data.val_batch_size", self.data.val_batch_size),
                           ("optim.lr_batch_size", self.optim.lr_batch_size)):
            if value < 1:
                raise ConfigError(f"{key} must be at least 1, not {value}")
        r = self.resolution
        if not 0 < r.min_res <= r.max_res:
            raise ConfigError(f"resolution: need 0 < min_res <= max_res, got {r.min_res} and {r.max_res}")
        if r.start_ramp > r.end_ramp:
            raise ConfigError(f"resolution: start_ramp ({r.start_ramp}) is after end_ramp ({r.end_ramp})")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: the configured lr is for ``lr_batch_size`` images per step."""
    return cfg.lr * global_batch / cfg.lr_batch_size


def lr_at(cfg: OptimConfig, epochs: int, epoch: float, peak: float) -> float:
    """lr at a fractional epoch (``epoch + step / steps_per_epoch``)."""
    if cfg.schedule == "step":
        return peak * cfg.step_ratio ** int(epoch // cfg.step_length) if epoch < epochs else 0.0
    # start at 1e-4 x peak rather than 0 so the first step moves (as ffcv-imagenet)
    return float(np.interp(epoch, [0, cfg.lr_peak_epoch, epochs], [1e-4 * peak, peak, 0.0]))


def resolution_at(cfg: ResolutionConfig, epoch: int) -> int:
    """ffcv-imagenet's progressive resizing: min_res, a linear ramp rounded to round_to, max_res."""
    if epoch <= cfg.start_ramp:
        return cfg.min_res
    if epoch >= cfg.end_ramp:
        return cfg.max_res
    res = np.interp(epoch, [cfg.start_ramp, cfg.end_ramp], [cfg.min_res, cfg.max_res])
    return int(round(res / cfg.round_to)) * cfg.round_to


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def tta_logits(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Logits of ``images``; with ``flip``, plus the logits of their mirror images (flip TTA)."""
    logits = model(images)
    if flip:
        logits = logits + model(torch.flip(images, dims=[3]))
    return logits


def classification_totals(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sums over one batch: ``[top-1 hits, top-k hits, cross-entropy, images]`` (1-D float tensor)."""
    hits = logits.topk(k, dim=1).indices == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                        torch.tensor(labels.numel(), device=labels.device)])


# ---------------------------------------------------------------------------------------------
# Model and optimiser
# ---------------------------------------------------------------------------------------------
def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"unknown model '{name}' (model.name). Any timm model works, e.g. resnet50 or "
                          f"resnet50_gcn; close names: {', '.join(close) or 'none'}")


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if cfg.blurpool:
        kwargs["aa_layer"] = timm.layers.BlurPool2d
    try:
        return timm.create_model(cfg.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{cfg.name}' does not accept {sorted(kwargs)} ({e}); "
                          "try model.blurpool=false") from e


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on normalisation parameters and biases (every 1-d parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrained_cfg_for(model: nn.Module, cfg: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """timm's pretrained_cfg for the trained weights (plain types only: weights_only-loadable)."""
    base = dict(getattr(model, "pretrained_cfg", {}) or {})
    r = cfg.resolution
    base.update(url="", hf_hub_id=None, file=None, tag="lkm_ffcv", num_classes=num_classes,
                input_size=(3, r.max_res, r.max_res), test_input_size=(3, r.val_res, r.val_res),
                crop_pct=VAL_CROP_RATIO, test_crop_pct=VAL_CROP_RATIO, interpolation="bilinear",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    plain = str | int | float | bool | tuple | list | type(None)
    return {k: v for k, v in base.items() if isinstance(v, plain)}


# ---------------------------------------------------------------------------------------------
# Checks done before any loader or worker starts
# ---------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    num_classes: int
    classes: list[str]
    resume_from: Path | None
    already_finished: bool


def plan_run(cfg: PretrainConfig) -> RunPlan:
    """Validate inputs and the run directory; raise ConfigError/CheckpointError with a fix."""
    from backbone.data import read_meta

    check_model_name(cfg.model.name)
    metas = {}
    for key in ("train", "val"):
        path = getattr(cfg.data, key)
        if not path:
            raise ConfigError(f"data.{key} is not set: give the .beton written by "
                              f"`python -m backbone.write_beton` (data.{key}=PATH)")
        if not Path(path).is_file():
            raise ConfigError(f"data.{key}: {path} does not exist "
                              "(write it with python -m backbone.write_beton)")
        try:
            metas[key] = read_meta(path)
        except Exception as e:  # noqa: BLE001 - reported with the file name and the fix
            raise ConfigError(f"data.{key}: cannot read {path}: {e}. Rewrite it with "
                              "`python -m backbone.write_beton`.") from e
    n_train, n_val = metas["train"]["num_classes"], metas["val"]["num_classes"]
    if n_train != n_val:
        raise ConfigError(f"data.train has {n_train} classes but data.val has {n_val}: "
                          "write both from the same class folders")
    num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else n_train
    if num_classes != n_train:
        raise ConfigError(f"model.num_classes={num_classes} but {cfg.data.train} has {n_train} classes; "
                          "drop model.num_classes (it defaults to the data's) or use matching data")

    run_dir = Path(cfg.run.dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        ckpt.check_compatible(ckpt.peek_checkpoint(latest), latest, expected_identity(cfg, num_classes))
    final = run_dir / "final.pth"
    finished = final.exists()
    if finished and latest is None:
        raise ConfigError(f"{final} exists but there is no checkpoint beside it: this is not a run "
                          "directory this trainer can resume; choose another run.dir")
    return RunPlan(num_classes, list(metas["train"].get("classes", [])), latest, finished)


def expected_identity(cfg: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {"format": TRAIN_FORMAT, "model_name": cfg.model.name, "num_classes": num_classes,
            "blurpool": cfg.model.blurpool}


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: PretrainConfig, plan: RunPlan, env: distrib.DistEnv, device: torch.device,
                 preempt: PreemptionFlag):
        from backbone.data import make_train_loader, make_val_loader

        self.cfg, self.plan, self.env, self.device, self.preempt = cfg, plan, env, device, preempt
        self.run_dir = Path(cfg.run.dir)
        self.on_gpu = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.on_gpu and cfg.train.amp else None
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = create_model(cfg.model, plan.num_classes).to(device, memory_format=self.memory_format)
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if self.on_gpu else None)
                    if env.distributed else model)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay), lr=0.0,
                                         momentum=cfg.optim.momentum)
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one layout
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=env.is_main)
        torch.manual_seed(cfg.train.seed + env.rank)
        np.random.seed((cfg.train.seed + env.rank) % 2**32)
        rng = self.resume(plan.resume_from) if plan.resume_from is not None else None

        res = resolution_at(cfg.resolution, self.epoch)
        self.train_loader = make_train_loader(
            cfg.data.train, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, resolution=res,
            device=device, distributed=env.distributed, seed=cfg.train.seed, order="random",
            os_cache=cfg.data.in_memory, drop_last=True)
        self.val_loader = make_val_loader(
            cfg.data.val, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers,
            resolution=cfg.resolution.val_res, device=device, distributed=env.distributed)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{cfg.data.train} has fewer images per process than data.batch_size="
                              f"{cfg.data.batch_size} (drop_last): lower the batch size")
        self.global_batch = cfg.data.batch_size * env.world_size
        self.peak = peak_lr(cfg.optim, self.global_batch)
        # Restored last: building the loaders draws from NumPy's global generator (ffcv's Loader seeds
        # itself with np.random.randint when given no seed, as the val loader is), which would shift the
        # resumed run's NumPy stream by one draw.
        if rng is not None:
            ckpt.restore_rng_state(rng)

    # --- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = [None] * self.env.world_size
        if distrib.is_initialized():
            torch.distributed.all_gather_object(rng, ckpt.capture_rng_state())
        else:
            rng = [ckpt.capture_rng_state()]
        state = {
            "format": TRAIN_FORMAT, "model_name": self.cfg.model.name, "num_classes": self.plan.num_classes,
            "blurpool": self.cfg.model.blurpool, "classes": self.plan.classes,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "step_in_epoch": self.step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.global_batch, "world_size": self.env.world_size, "rng": rng,
            "config": to_dict(self.cfg),
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def save(self) -> None:
        state = self.state()  # collective (RNG gather): every rank takes part
        if self.env.is_main:
            path = ckpt.save_checkpoint(state, self.run_dir, self.step, keep=self.cfg.run.keep_checkpoints)
            log.info("checkpoint: %s (epoch %d, step %d)", path, self.epoch, self.step)
        distrib.barrier()

    def resume(self, path: Path) -> dict[str, Any] | None:
        """Load the training state of checkpoint ``path``; return this rank's RNG state to restore."""
        state = ckpt.load_checkpoint(path, expected_identity(self.cfg, self.plan.num_classes))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "model_ema" not in state:
                raise ckpt.CheckpointError(f"{path} has no EMA weights but train.ema=true; resume with "
                                           "train.ema=false or start a new run.dir")
            self.ema.module.load_state_dict(state["model_ema"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.resumed_global_batch = state["global_batch"]
        log.info("resumed from checkpoint %s at epoch %d, step %d (step %d of the epoch)", path,
                 self.epoch, self.step, self.step_in_epoch)
        rng = state["rng"]
        if len(rng) == self.env.world_size:
            return rng[self.env.rank]
        log.warning("checkpoint was written by %d processes, this run has %d: RNG states not restored",
                    len(rng), self.env.world_size)
        return None

    # --- loops --------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the end (``'finished'``) or until a signal (``'preempted'``)."""
        cfg = self.cfg
        if getattr(self, "resumed_global_batch", self.global_batch) != self.global_batch:
            raise ckpt.CheckpointError(
                f"the checkpoint in {self.run_dir} was trained with a global batch of "
                f"{self.resumed_global_batch}, this run has {self.global_batch} "
                f"(data.batch_size x {self.env.world_size} processes): resume with the same global batch")
        if self.env.is_main:
            log.info("training %s: %d classes, %d epochs x %d steps, global batch %d (%d processes), "
                     "peak lr %.4g", cfg.model.name, self.plan.num_classes, cfg.train.epochs,
                     self.steps_per_epoch, self.global_batch, self.env.world_size, self.peak)
        while self.epoch < cfg.train.epochs:
            status = self.train_epoch()
            if status == "preempted":
                return status
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()
            last = self.epoch == cfg.train.epochs
            if last or self.epoch % cfg.train.eval_every == 0:
                stats = self.evaluate()
                self.metrics.write(kind="val", epoch=self.epoch, step=self.step, **stats)
                if self.env.is_main:
                    log.info("epoch %d/%d: val top-1 %.4f, top-5 %.4f, loss %.4f", self.epoch,
                             cfg.train.epochs, stats["top1"], stats["top5"], stats["loss"])
            if distrib.any_rank(bool(self.preempt), self.device) and not last:
                self.preempt.hand_over(self.env.is_main)
                return "preempted"
        return "finished"

    def train_epoch(self) -> str:
        from backbone.data import set_epoch, set_train_resolution

        cfg = self.cfg
        res = resolution_at(cfg.resolution, self.epoch)
        set_train_resolution(self.train_loader, res)
        set_epoch(self.train_loader, self.epoch)  # sample order = f(seed, epoch), also after a resume
        self.model.train()
        skip = self.step_in_epoch  # resumed mid-epoch: the loader replays the same order (seed + epoch)
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        loss_sum = torch.zeros((), device=self.device)
        n_logged, t0, images_seen = 0, time.perf_counter(), 0
        progress = Progress(self.train_loader, self.steps_per_epoch,
                            f"epoch {self.epoch + 1}/{cfg.train.epochs}", enabled=self.env.is_main,
                            every_s=cfg.run.log_every_s, logger=log)
        batches = iter(progress)  # one iterator: draining it after a stop must finish *this* epoch
        for i, (images, labels) in enumerate(batches):
            if i < skip:
                continue
            lr = lr_at(cfg.optim, cfg.train.epochs, self.epoch + i / self.steps_per_epoch, self.peak)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.criterion(self.ddp(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            self.step, self.step_in_epoch = self.step + 1, i + 1
            loss = loss.detach()
            bad |= ~torch.isfinite(loss)
            loss_sum += loss
            n_logged += 1
            images_seen += images.shape[0]

            # A signal may reach the ranks at different steps: they agree through an all-reduce,
            # which syncs, so multi-process runs look only every check_every_steps steps.
            periodic = self.step % cfg.run.check_every_steps == 0 or i + 1 == self.steps_per_epoch
            stop = distrib.any_rank(bool(self.preempt), self.device) if periodic or not self.env.distributed \
                else False
            if stop or periodic:
                if not self.all_finite(bad):
                    self.drain(batches)
                    raise NonFiniteLossError(
                        f"non-finite training loss before step {self.step} (epoch {self.epoch}); the run "
                        "stopped without writing a new checkpoint. Last good checkpoint: "
                        f"{ckpt.latest_checkpoint(self.run_dir) or 'none'}. Lower optim.lr or check the "
                        "data, then start again with the same run.dir to resume from it.")
                now = time.perf_counter()
                rate = images_seen * self.env.world_size / max(now - t0, 1e-9)
                total = distrib.all_reduce_sum(loss_sum.clone())
                mean_loss = (total / (n_logged * self.env.world_size)).item()
                progress.update(loss=mean_loss, lr=lr, res=res, img_s=round(rate))
                self.metrics.write(kind="train", epoch=self.epoch, step=self.step, loss=mean_loss, lr=lr,
                                   resolution=res, images_per_s=rate)
                loss_sum.zero_()
                n_logged, t0, images_seen = 0, now, 0
            if stop:
                self.drain(batches)
                self.save()
                self.preempt.hand_over(self.env.is_main)
                return "preempted"
        return "done"

    @staticmethod
    def drain(it: Any) -> None:
        # ffcv's loader thread waits for the epoch to be consumed; leaving it half-read can hang exit
        for _ in it:
            pass

    def all_finite(self, bad: torch.Tensor) -> bool:
        return not distrib.any_rank(bool(bad.item()), self.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        k = min(5, self.plan.num_classes)
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)  # top1, top5, loss sum, count
        for images, labels in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = tta_logits(model, images, self.cfg.train.flip_tta)
            totals += classification_totals(logits.float(), labels, k).to(totals)
        distrib.all_reduce_sum(totals)
        top1, top5, loss, n = totals.tolist()
        return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "loss": loss / max(n, 1),
                "top5_error": 1 - top5 / max(n, 1), "images": int(n)}

    def write_final(self) -> Path:
        """``final.pth``: weights only (EMA if used) + what timm needs to rebuild the model."""
        model = self.ema.module if self.ema is not None else self.model
        sd = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
              for k, v in model.state_dict().items()}
        final = {
            "state_dict": sd, "model_name": self.cfg.model.name,
            "pretrained_cfg": pretrained_cfg_for(self.model, self.cfg, self.plan.num_classes),
            "num_classes": self.plan.num_classes, "format": WEIGHTS_FORMAT,
            "model_kwargs": {"aa_layer": "blurpool"} if self.cfg.model.blurpool else {},
            "classes": self.plan.classes, "epochs": self.epoch, "ema": self.ema is not None,
        }
        path = self.run_dir / "final.pth"
        ckpt.save_atomic(final, path)
        return path


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run(cfg: PretrainConfig, preempt: PreemptionFlag | None = None) -> str:
    """Train (or resume) the run described by ``cfg``; returns 'finished', 'preempted' or 'done before'."""
    plan = plan_run(cfg)  # every rank checks; errors before any loader/worker exists
    return run_stage(cfg, plan, lambda env, device, flag: Trainer(cfg, plan, env, device, flag), preempt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(
        "ImageNet pretraining of a timm model (ffcv data, DDP, resumable).", prog="python -m backbone.train",
        epilog="config keys (section.key=default):\n" + describe_keys(PretrainConfig))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        status = run(cfg)
    except (ConfigError, ckpt.CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if status in ("finished", "done before", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
