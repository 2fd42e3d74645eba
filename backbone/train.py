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

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from backbone.artifacts import FinalWeights, PretrainCheckpoint
from backbone.evaluate import PAPER, evaluate_classifier, write_record
from backbone.models import check_input_sizes, create_backbone
from backbone.weights import WeightsMismatchError
from engine import checkpoint as ckpt
from engine import distributed as distrib
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

log = logging.getLogger("backbone.train")


# ---------------------------------------------------------------------------------------------
# Config schema (sections as in ffcv-imagenet's YAML files)
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "resnet50"  # any timm model name; resnet50_gcn after `import backbone`
    blurpool: bool = True  # blur before every strided conv, as ffcv-imagenet (backbone.antialias)
    num_classes: int | None = None  # None: the class count of the training .beton


@dataclass
class DataConfig:
    train: str = ""  # training .beton (python -m backbone.write_beton)
    val: str = ""  # validation .beton
    global_batch: int = 4096  # images per optimiser step over all processes (the recipe's batch)
    max_batch_per_process: int = 0  # a process holding more accumulates gradients over micro-batches; 0: no limit
    val_batch_size: int = 256  # per process (evaluation only: no effect on results)
    val_max_images: int = 0  # validate on the first N images only (rehearsals); 0: all
    num_workers: int = 12  # ffcv decoding threads per process (at least 1)
    in_memory: bool = True  # ffcv os_cache: keep the .beton in the page cache


    RENAMED = {"batch_size": "the recipe now states the batch over all processes: data.global_batch (e.g. 512 "
                             "per GPU on 8 GPUs is data.global_batch=4096)"}


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
    steps_per_epoch: int = 0  # 0: the whole .beton each epoch; N: its first N steps only (rehearsals)
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower); used by the resume test
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class RunConfig:
    dir: str = ""  # run directory; default runs/pretrain/<model name>
    keep_checkpoints: int = 2
    log_every_s: float = 30.0  # one-line progress summary period when not on a terminal
    check_every_steps: int = 50  # how often the loss is checked for NaN/inf (each check syncs)
    preempt_at_step: int = 0  # rehearsals: act as if SLURM's warning signal came at this step (once); 0: never


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # Keys that cannot change the trained network: paths (the data is identified by content in run.json),
    # machine settings, logging. Everything else is the recipe.
    NOT_RECIPE = ("data.train", "data.val", "data.val_batch_size", "data.val_max_images", "data.num_workers",
                  "data.in_memory",
                  "train.eval_every", "train.device", "train.deterministic", "run.dir", "run.keep_checkpoints",
                  "run.log_every_s", "run.check_every_steps", "run.preempt_at_step")

    # Every number's valid range, checked before anything runs (a negative lr would train by gradient ascent).
    RANGES = {"data.global_batch": ">= 1", "data.max_batch_per_process": ">= 0", "data.val_batch_size": ">= 1",
              "data.num_workers": ">= 1", "optim.lr": "> 0", "optim.lr_batch_size": ">= 1",
              "optim.lr_peak_epoch": ">= 0", "optim.step_ratio": "(0, 1]", "optim.step_length": ">= 1",
              "optim.momentum": "[0, 1)", "optim.weight_decay": ">= 0", "optim.label_smoothing": "[0, 1)",
              "resolution.round_to": ">= 1", "resolution.val_res": ">= 1", "train.epochs": ">= 1",
              "train.eval_every": ">= 1", "train.ema_decay": "[0, 1]", "run.keep_checkpoints": ">= 0",
              "run.log_every_s": "> 0", "run.check_every_steps": ">= 1",
              "train.steps_per_epoch": ">= 0", "data.val_max_images": ">= 0", "run.preempt_at_step": ">= 0"}

    def validate(self) -> None:
        if not self.run.dir:
            self.run.dir = f"runs/pretrain/{self.model.name}"
        check_ranges(self, self.RANGES)
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
# Model and optimiser
# ---------------------------------------------------------------------------------------------
def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Constructor arguments beyond the name and class count; final.pth records them."""
    return {"anti_aliasing": "blurpool" if cfg.blurpool else None}


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return create_backbone(cfg.name, num_classes=num_classes, **model_kwargs(cfg))


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
                crop_pct=DEFAULT_CROP_PCT, test_crop_pct=DEFAULT_CROP_PCT, interpolation="bilinear",
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    plain = str | int | float | bool | tuple | list | type(None)
    return {k: v for k, v in base.items() if isinstance(v, plain)}


# ---------------------------------------------------------------------------------------------
# Checks done before any loader or worker starts
# ---------------------------------------------------------------------------------------------
@dataclass
class PretrainInputs:
    """What the checks found: the data's classes and the state of the run directory."""

    num_classes: int
    classes: list[str]
    data: dict[str, Any]  # the .beton files, named by the SHA-256 of the JSON the writer put beside each
    run: RunDirState


def check_inputs(cfg: PretrainConfig) -> PretrainInputs:
    """Validate inputs and the run directory; raise ConfigError/CheckpointError with a fix."""
    from backbone.write_beton import check_beton, meta_path, read_meta

    # every size the run feeds the model: the resolution ramp, the validation's and Table 6's protocol's
    sizes = {resolution_at(cfg.resolution, e) for e in range(cfg.train.epochs)} | {cfg.resolution.val_res,
                                                                                  PAPER.resolution}
    check_input_sizes(cfg.model.name, sizes, "model.name", **model_kwargs(cfg.model))
    metas = {}
    for key in ("train", "val"):
        path = getattr(cfg.data, key)
        if not path:
            raise ConfigError(f"data.{key} is not set: give the .beton written by "
                              f"`python -m backbone.write_beton` (data.{key}=PATH)")
        require_file(path, f"data.{key}", "write it with `python -m backbone.write_beton`")
        try:
            metas[key] = read_meta(path)
            check_beton(path, metas[key])
        except Exception as e:  # noqa: BLE001 - reported with the file name and the fix
            raise ConfigError(f"data.{key}: cannot read {path}: {e}. Rewrite it with "
                              "`python -m backbone.write_beton`.") from e
    n_train, n_val = metas["train"]["num_classes"], metas["val"]["num_classes"]
    if n_train != n_val:
        raise ConfigError(f"data.train has {n_train} classes but data.val has {n_val}: "
                          "write both from the same class folders")
    if metas["train"].get("classes") != metas["val"].get("classes"):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(metas["train"]["classes"], metas["val"]["classes"],
                                                          strict=True)) if a != b]
        raise ConfigError(f"data.train and data.val map classes differently (label {diff[0][0]} is "
                          f"'{diff[0][1]}' in one and '{diff[0][2]}' in the other; {len(diff)} differ): write both "
                          "from folders with the same class names")
    num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else n_train
    if num_classes != n_train:
        raise ConfigError(f"model.num_classes={num_classes} but {cfg.data.train} has {n_train} classes; "
                          "drop model.num_classes (it defaults to the data's) or use matching data")
    state = inspect_run_dir(cfg.run.dir, expected_identity(cfg, num_classes))
    data = {key: {"path": str(Path(getattr(cfg.data, key)).resolve()),
                  "meta_sha256": file_sha256(meta_path(getattr(cfg.data, key)))} for key in ("train", "val")}
    return PretrainInputs(num_classes, list(metas["train"].get("classes", [])), data, state)


def expected_identity(cfg: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return PretrainCheckpoint.identity(cfg.model.name, num_classes, cfg.model.blurpool)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: PretrainConfig, inputs: PretrainInputs, env: distrib.DistEnv, device: torch.device,
                 preempt: PreemptionFlag):
        import numba

        from backbone.data import make_train_loader, make_val_loader

        if cfg.data.num_workers > numba.config.NUMBA_NUM_THREADS:
            raise ConfigError(f"data.num_workers={cfg.data.num_workers}, but ffcv (numba) runs at most "
                              f"{numba.config.NUMBA_NUM_THREADS} threads on this machine: lower it (the sbatch "
                              "scripts set it from --cpus-per-task)")
        self.cfg, self.inputs, self.env, self.device = cfg, inputs, env, device
        self.run_dir = Path(cfg.run.dir)
        self.on_gpu = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.on_gpu and cfg.train.amp else None
        # half-precision batches feed autocast; an fp32 model (train.amp=false) needs fp32 ones
        self.input_dtype = torch.float16 if self.amp_dtype is not None else torch.float32
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = create_model(cfg.model, inputs.num_classes).to(device, memory_format=self.memory_format)
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if self.on_gpu else None)
                    if env.distributed else model)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay), lr=0.0,
                                         momentum=cfg.optim.momentum)
        self.ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.epoch, self.step_in_epoch = 0, 0
        self.flops = TrainFlops(model)
        self.resolution = resolution_at(cfg.resolution, self.epoch)
        self.loop = TrainLoop(env=env, device=device, preempt=preempt,
                              metrics=MetricsWriter(self.run_dir / "metrics.jsonl", enabled=env.is_main),
                              flops_per_image=lambda: self.flops(3, self.resolution, self.resolution),
                              logger=log, models=[model] + ([self.ema.module] if self.ema is not None else []),
                              checkpoint_state=self.checkpoint_state, run_dir=self.run_dir,
                              keep_checkpoints=cfg.run.keep_checkpoints, check_every=cfg.run.check_every_steps,
                              log_every_s=cfg.run.log_every_s, preempt_at_step=cfg.run.preempt_at_step)
        torch.manual_seed(cfg.train.seed + env.rank)
        np.random.seed((cfg.train.seed + env.rank) % 2**32)
        resumed = self.resume(inputs.run.resume_from) if inputs.run.resume_from is not None else None

        self.batch = split_batch(cfg.data.global_batch, env.world_size, cfg.data.max_batch_per_process)
        res = resolution_at(cfg.resolution, self.epoch)
        self.train_loader = make_train_loader(
            cfg.data.train, batch_size=self.batch.micro_batch, num_workers=cfg.data.num_workers, resolution=res,
            device=device, distributed=env.distributed, seed=cfg.train.seed, order="random",
            os_cache=cfg.data.in_memory, drop_last=True, dtype=self.input_dtype)
        self.val_loader = make_val_loader(
            cfg.data.val, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers,
            resolution=cfg.resolution.val_res, device=device, distributed=env.distributed, dtype=self.input_dtype,
            max_images=cfg.data.val_max_images)
        self.steps_per_epoch = len(self.train_loader) // self.batch.accumulation
        if cfg.train.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{cfg.data.train} has fewer images than one global batch (data.global_batch="
                              f"{cfg.data.global_batch}, drop_last): lower the batch")
        self.global_batch = self.batch.global_batch  # a resume with another one was refused (run: resume_settings)
        self.peak = peak_lr(cfg.optim, self.global_batch)
        # Restored last: building the loaders draws from NumPy's global generator (ffcv's Loader seeds
        # itself with np.random.randint when given no seed, as the val loader is), which would shift the
        # resumed run's NumPy stream by one draw.
        if resumed is not None:
            ckpt.restore_rank_rng(resumed.rng, env.rank, env.world_size)

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        return PretrainCheckpoint(
            model_name=cfg.model.name, num_classes=self.inputs.num_classes, blurpool=cfg.model.blurpool,
            classes=self.inputs.classes, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            epoch=self.epoch, step=self.loop.step, step_in_epoch=self.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch, global_batch=self.global_batch, world_size=self.env.world_size,
            rng=rng, config=to_dict(cfg), model_ema=self.ema.module.state_dict() if self.ema is not None else None,
        ).to_dict()

    def resume(self, path: Path) -> PretrainCheckpoint:
        state = PretrainCheckpoint.load(path, expected_identity(self.cfg, self.inputs.num_classes))
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if self.ema is not None:
            if state.model_ema is None:
                raise ckpt.CheckpointError(f"{path} has no EMA weights but train.ema=true; resume with "
                                           "train.ema=false or start a new run.dir")
            self.ema.module.load_state_dict(state.model_ema)
        self.epoch, self.loop.step, self.step_in_epoch = state.epoch, state.step, state.step_in_epoch
        log.info("resumed from checkpoint %s at epoch %d, step %d (step %d of the epoch)", path,
                 self.epoch, state.step, self.step_in_epoch)
        return state

    # --- loops --------------------------------------------------------------------------------
    def fit(self) -> RunStatus:
        """Train to the end, or until a signal (then a checkpoint is on disk and the job requeued)."""
        cfg = self.cfg
        if self.env.is_main:
            log.info("training %s: %d classes, %d epochs x %d steps, global batch %d = %d processes x %d%s, "
                     "peak lr %.4g", cfg.model.name, self.inputs.num_classes, cfg.train.epochs, self.steps_per_epoch,
                     self.global_batch, self.env.world_size, self.batch.per_process,
                     f" (accumulated over {self.batch.accumulation} micro-batches of {self.batch.micro_batch})"
                     if self.batch.accumulation > 1 else "", self.peak)
        try:
            return self.train_epochs()
        finally:
            self.loop.metrics.flush()

    def train_epochs(self) -> RunStatus:
        cfg = self.cfg
        while self.epoch < cfg.train.epochs:
            self.train_epoch()
            if self.loop.preempted:
                return RunStatus.PREEMPTED
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            last = self.epoch == cfg.train.epochs
            if last or self.epoch % cfg.train.eval_every == 0:
                self.validate()  # before the checkpoint: weights with a NaN validation loss are not "good"
            self.loop.save()
            if not last and self.loop.stop_requested():
                return RunStatus.PREEMPTED
        self.paper_scores = self.evaluate_paper_protocol()
        return RunStatus.FINISHED

    def train_epoch(self) -> None:
        """One epoch (or its rest, after a resume mid-epoch), as ffcv-imagenet's ``train_loop``."""
        from backbone.data import epoch_batches, set_epoch, set_train_resolution

        cfg = self.cfg
        res = self.resolution = resolution_at(cfg.resolution, self.epoch)
        set_train_resolution(self.train_loader, res)
        set_epoch(self.train_loader, self.epoch)  # sample order = f(seed, epoch), also after a resume
        self.model.train()
        start = self.step_in_epoch  # resumed mid-epoch: the loader replays the same order, we skip ahead
        accumulation = self.batch.accumulation
        batches = epoch_batches(self.train_loader, skip=start * accumulation)
        for i, micro_batches in enumerate(self.loop.steps(
                batches, accumulation=accumulation, length=self.steps_per_epoch - start, total=self.steps_per_epoch,
                initial=start, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}"), start=start):
            lr = lr_at(cfg.optim, cfg.train.epochs, self.epoch + i / self.steps_per_epoch, self.peak)
            loss = self.train_step(micro_batches, lr)
            self.step_in_epoch = i + 1
            self.loop.record(loss, self.batch.per_process, epoch=self.epoch, lr=lr, resolution=res)

    def train_step(self, micro_batches: MicroBatches, lr: float) -> torch.Tensor:
        """One optimiser step over this process's share of the global batch (its micro-batches)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = backward_accumulated(self.ddp, micro_batches, self.loss, self.env.distributed)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.loop.step)
        return loss

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        with autocast(self.device, self.amp_dtype):
            return self.criterion(self.ddp(images), labels)

    def validate(self) -> dict[str, float]:
        stats = self.evaluate()
        self.loop.metrics.write(kind="val", epoch=self.epoch, step=self.loop.step, **stats)
        self.loop.check_validation(stats["loss"], f"validation loss after epoch {self.epoch}")
        self.draw_curves()
        if self.env.is_main:
            log.info("epoch %d/%d: val top-1 %.4f, top-5 %.4f, loss %.4f", self.epoch,
                     self.cfg.train.epochs, stats["top1"], stats["top5"], stats["loss"])
        return stats

    def draw_curves(self) -> None:
        """``curves.png`` in the run directory, redrawn from metrics.jsonl (rank 0)."""
        if self.env.is_main:
            self.loop.metrics.flush()
            draw_curves({self.cfg.model.name: self.run_dir}, self.run_dir / "curves.png",
                        f"pretraining {self.cfg.model.name} ({self.run_dir.name})")

    @property
    def trained_model(self) -> nn.Module:
        """What final.pth holds: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict[str, float]:
        """ffcv-imagenet's validation (``resolution.val_res``, flip averaging with ``train.flip_tta``)."""
        return evaluate_classifier(self.trained_model, self.val_loader, self.device, flip=self.cfg.train.flip_tta,
                                   amp_dtype=self.amp_dtype)

    def evaluate_paper_protocol(self) -> dict[str, float]:
        """Table 6's protocol on the final weights: the 224 centre crop of the 256 image, one view."""
        from backbone.data import set_val_resolution, val_crop_ratio

        if abs(val_crop_ratio(self.val_loader) - PAPER.crop_ratio) > 1e-9:
            raise RuntimeError(f"the validation loader crops {val_crop_ratio(self.val_loader)}, not {PAPER.crop_ratio}")
        set_val_resolution(self.val_loader, PAPER.resolution)
        scores = evaluate_classifier(self.trained_model, self.val_loader, self.device, flip=PAPER.flip,
                                     amp_dtype=self.amp_dtype)
        set_val_resolution(self.val_loader, self.cfg.resolution.val_res)
        if self.env.is_main:
            log.info("final weights, %s: top-1 error %.2f%%, top-5 error %.2f%%", PAPER.describe(),
                     100 * scores["top1_error"], 100 * scores["top5_error"])
        return scores

    def write_final(self) -> Path:
        """``final.pth`` (weights, EMA if used, what rebuilds the network, the run's provenance), then the
        scores of the paper's protocol beside it, naming it by content hash."""
        final = FinalWeights(
            state_dict=ckpt.export_weights(self.trained_model), model_name=self.cfg.model.name,
            num_classes=self.inputs.num_classes,
            pretrained_cfg=pretrained_cfg_for(self.model, self.cfg, self.inputs.num_classes),
            model_kwargs=model_kwargs(self.cfg.model), classes=self.inputs.classes, epochs=self.epoch,
            ema=self.ema is not None, provenance=read_run_record(self.run_dir))
        path = final.save(self.run_dir / "final.pth")
        write_record(path, self.cfg.data.val, PAPER, self.paper_scores)
        return path


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run(cfg: PretrainConfig, preempt: PreemptionFlag | None = None) -> RunStatus:
    """Train (or resume) the run described by ``cfg``."""
    inputs = check_inputs(cfg)  # every rank checks; errors before any loader/worker exists
    return run_stage(cfg, inputs.run, lambda env, device, flag: Trainer(cfg, inputs, env, device, flag), preempt,
                     provenance={"global_batch": cfg.data.global_batch, "data": inputs.data},
                     resume_settings={"global_batch": cfg.data.global_batch})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(
        "ImageNet pretraining of a timm model (ffcv data, DDP, resumable).", prog="python -m backbone.train",
        epilog="config keys (section.key=default):\n" + describe_keys(PretrainConfig))
    args = parser.parse_args(argv)
    return run_cli(lambda: load_config(PretrainConfig, args.config, args.overrides), run,
                   (ConfigError, ckpt.CheckpointError, NonFiniteLossError, WeightsMismatchError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
