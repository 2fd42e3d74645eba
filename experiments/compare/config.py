"""The comparison's config schema: ``CompareConfig`` and its sections (``python -m experiments.compare --help``).

Each dataclass field is a config key (``section.key=value`` on the command line); ``validate`` checks
what the types cannot (names of backbones and heads, stage configs given) before anything is planned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.config import ConfigError

__all__ = ["StageConfig", "PretrainStageConfig", "EvaluateConfig", "StatsConfig", "FiguresConfig", "RehearseConfig",
           "ResourceConfig", "LaunchConfig", "CompareConfig"]


@dataclass
class StageConfig:
    config: str = ""  # the stage's YAML; {backbone} is replaced by the backbone's name
    overrides: list[str] = field(default_factory=list)  # key=value for that stage (data paths, ...)


@dataclass
class PretrainStageConfig(StageConfig):
    # the pretraining seeds; empty: the comparison's seeds (one pretraining per fine-tune seed). With
    # fewer, fine-tune seed s starts from pretraining seed s if there is one, else from the first.
    seeds: list[int] = field(default_factory=list)


@dataclass
class EvaluateConfig:
    ms: bool = False  # multi-scale inference (segmentation.evaluate --ms)
    flip: bool = False
    boundary_width: int = 5
    max_images: int = 0  # 0: the whole validation split
    # also score every fine-tune with the dense CRF (segmentation.evaluate --crf, DeepLab's defaults) on the
    # same inference: extra "+ CRF" rows and comparisons beside the plain ones, never mixed with them
    crf: bool = False


@dataclass
class StatsConfig:
    # of the differences' intervals; 1 - confidence is also the family-wise level of the Holm-corrected verdicts
    confidence: float = 0.95
    replicates: int = 2000  # of the paired image bootstrap that estimates the image level of each interval
    seed: int = 0  # of the bootstrap's random generator: the same runs give the same intervals


@dataclass
class FiguresConfig:
    figure6_images: int = 4  # rows of Figure 6 (the first N validation images)
    headline_head: str = "gcn_br"  # per-image difference figure: ResNet50-GCN vs ResNet50 under this head
    difference_images: int = 3  # images shown where the headline comparison helps most, and hurts most
    vrf_images: int = 4  # images whose valid receptive field is measured (Figure 3)
    vrf_scales: list[float] = field(default_factory=lambda: [1.0, 2.0])  # 2.0: the paper's (B)
    vrf_share: float = 0.9  # share of the gradient mass the VRF area holds


@dataclass
class RehearseConfig:
    """``--rehearse``: the plan with every stage cut short, on the cluster it will run on (its own output folder)."""

    steps: int = 40  # optimiser steps of every stage (pretraining: one epoch of this many steps)
    preempt_at: int = 15  # at this step each stage acts as if SLURM's warning signal came: checkpoint, requeue,
    # resume (0: no preemption)
    images: int = 500  # validation images of every evaluation (pretraining's, the fine-tunes', the collect step's)


@dataclass
class ResourceConfig:
    nodes: int = 1
    tasks_per_node: int = 8  # one per GPU
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    mem_gb: int = 0  # 0: the partition's default


@dataclass
class LaunchConfig:
    launcher: Literal["local", "sbatch"] = "local"
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # added to every sbatch call
    pretrain: ResourceConfig = field(default_factory=lambda: ResourceConfig(2, 8, 8, 12, "24:00:00"))
    finetune: ResourceConfig = field(default_factory=lambda: ResourceConfig(1, 8, 8, 8, "12:00:00"))
    collect: ResourceConfig = field(default_factory=lambda: ResourceConfig(1, 1, 1, 8, "02:00:00"))


@dataclass
class CompareConfig:
    output: str = "runs/table6"
    backbones: list[str] = field(default_factory=lambda: ["resnet50", "resnet50_gcn"])
    heads: list[str] = field(default_factory=lambda: ["baseline", "gcn_br"])  # add gcn for Figure 6's GCN column
    seeds: list[int] = field(default_factory=lambda: [0])  # every run once per seed (train.seed), own directory
    pretrain: PretrainStageConfig = field(
        default_factory=lambda: PretrainStageConfig("configs/pretrain/{backbone}_16_epochs.yaml"))
    finetune: StageConfig = field(default_factory=lambda: StageConfig("configs/segmentation/voc_stage2.yaml"))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    rehearse: RehearseConfig = field(default_factory=RehearseConfig)

    def validate(self) -> None:
        """ConfigError, with the fix, for a matrix that cannot be planned."""
        self._check_matrix()
        for key in ("pretrain", "finetune"):
            if not getattr(self, key).config:
                raise ConfigError(f"{key}.config is not set: give the stage's YAML config")
        for key, seeds in (("seeds", self.seeds), ("pretrain.seeds", self.pretrain.seeds)):
            if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
                raise ConfigError(f"{key} must list distinct seeds >= 0, got {seeds}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed, e.g. seeds=[0] or seeds=[0, 1, 2]")
        if self.evaluate.crf:  # before hours of training, not at the collect step
            from segmentation.crf import CRFUnavailableError, require_pydensecrf

            try:
                require_pydensecrf()
            except CRFUnavailableError as e:
                raise ConfigError(f"evaluate.crf: {e}") from e
        r = self.rehearse
        if r.steps < 1 or r.images < 1 or not 0 <= r.preempt_at < r.steps:
            raise ConfigError(f"rehearse: need steps >= 1, images >= 1 and 0 <= preempt_at < steps, got steps="
                              f"{r.steps}, images={r.images}, preempt_at={r.preempt_at}")
        if not 0 < self.stats.confidence < 1 or self.stats.replicates < 2:
            raise ConfigError(f"stats: need 0 < confidence < 1 and replicates >= 2, got {self.stats.confidence} "
                              f"and {self.stats.replicates}")

    @property
    def pretrain_seeds(self) -> list[int]:
        """The seeds each backbone is pretrained with."""
        return list(self.pretrain.seeds or self.seeds)

    def backbone_seed(self, seed: int) -> int:
        """The pretraining seed the fine-tunes of ``seed`` start from."""
        return seed if seed in self.pretrain_seeds else self.pretrain_seeds[0]

    def _check_matrix(self) -> None:
        # imported here: the model registry and the heads pull in timm and torch, the schema does not need them
        from segmentation.heads import HEADS
        from segmentation.network import check_backbone

        if not self.backbones or not self.heads:
            raise ConfigError("backbones and heads must each name at least one entry")
        for b in self.backbones:
            try:
                check_backbone(b, what="model")  # known to timm, with the feature pyramid the fine-tune needs
            except ValueError as e:
                raise ConfigError(f"backbones: {e}") from e
        bad = [h for h in self.heads if h not in HEADS]
        if bad:
            raise ConfigError(f"heads: {bad} are not heads; choose from {', '.join(HEADS)}")
        for key in ("backbones", "heads"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ConfigError(f"{key} lists an entry twice: {values}")
