"""Table 6 end to end: ResNet50 vs ResNet50-GCN, pretrained, fine-tuned, evaluated, tabled and drawn.

    python -m experiments.compare --config configs/table6.yaml                    # run what is missing
    python -m experiments.compare --config configs/table6.yaml launch.launcher=sbatch --wait
    python -m experiments.compare --config configs/table6.yaml --collect          # gather only
    python -m experiments.compare --config configs/table6.yaml --dry-run          # show the plan
    python -m experiments.compare --config configs/table6.yaml --plan-seeds 0.2,5.5   # seeds for these differences

The matrix is {backbones} x {heads} x {seeds} (Table 6: resnet50, resnet50_gcn x baseline, gcn_br).
Each backbone is pretrained once per seed (``backbone.train``, ``train.seed``), each (backbone, head,
seed) is fine-tuned from that backbone's ``final.pth`` of the same seed (``segmentation/finetune.py``),
each fine-tune is evaluated (``segmentation.evaluate``), and the results are collected: each cell as
mean ± standard deviation over seeds, each comparison of the paper as a difference with a 95 %
interval (paired over seeds and validation images), a verdict corrected for the table's family of
comparisons (Holm) and the smallest difference its seeds could detect. Everything lives under ``output``::

    pretrain/<backbone>/seed<s>/          a pretraining run directory (config.yaml, run.json, final.pth,
                                          eval_imagenet_224_crop0.875.json)
    finetune/<backbone>_<head>/seed<s>/   a fine-tuning run directory, + eval_final_<settings>.json
                                          (and .per_image.npz), predictions/; with evaluate.crf=true
                                          also eval_final_<settings>_crf.json, predictions_crf/
    table6.md, table6.json                the table, the comparisons, every figure with its provenance
    table6.png, per_image_difference.png  the table as bars with error bars; where the headline helps/hurts
    figure6_<backbone>.png                input | one column per head | ground truth, per image (Figure 6)
    figure3/receptive_field.png           valid receptive field of every fine-tuned network (Figure 3)
    curves_pretrain.png, curves_finetune.png  every run of the stage side by side: loss and validation metric
    logs/                                 SLURM job logs; jobs.json: the job ids submitted per run

Finished runs (a ``final.pth``) are reused, unfinished ones resume from their last checkpoint. A run
directory whose record differs from the plan (config keys, world size, global batch) is an error that
names them; a fine-tune whose backbone weights have changed since is moved aside and trained again;
scores are recomputed when they belong to other weights or settings. ``evaluate.crf=true`` adds a score
with the dense CRF per fine-tune ("+ CRF" rows and comparisons, ``segmentation_crf`` and
``comparisons_crf`` in table6.json), never mixed with the plain ones. Launchers: ``local`` runs the
stages one after the other (one process per GPU through torchrun on a multi-GPU machine); ``sbatch``
submits one job per run with ``slurm/imagenet_pretrain.sh`` and ``slurm/segmentation_finetune.sh``
(``--dependency=afterok``: a fine-tune starts when the pretraining of its backbone and seed has
finished), then a collect job (``--collect``) after all of them.

Modules, in the order a call goes through them: ``config`` (the schema), ``plan`` (the runs, recipe
drift, the checks before anything starts), ``launch`` (local runs; SLURM jobs, ``jobs.json``, waiting),
``collect`` (evaluation, records with their provenance, seeds aggregated, comparisons, the files written),
``stats`` (summaries over seeds, intervals, Holm, the seed planner), ``table`` (the paper's figures, markdown),
``cli`` (``main``).
"""
from __future__ import annotations

from experiments import ROOT

from .cli import build_parser, main, print_summary
from .collect import (
    aggregate,
    chance_miou,
    check_score,
    collect,
    compared,
    comparisons,
    eval_json,
    evaluate_runs,
    finetune_record,
    gather,
    judge,
    pretrain_record,
    seed_plan,
    setting,
)
from .config import (
    CompareConfig,
    EvaluateConfig,
    FiguresConfig,
    LaunchConfig,
    PretrainStageConfig,
    ResourceConfig,
    StageConfig,
    StatsConfig,
)
from .launch import run_local, submit_sbatch, wait_for_table
from .plan import LAUNCHER_KEYS, Run, StageFailed, check_plan, move_aside, not_recipe, plan, recipe_drift, stale_reason
from .stats import (
    Components,
    Difference,
    Summary,
    detectable_difference,
    format_difference,
    holm,
    paired_difference,
    seeds_needed,
    summarize,
    verdict,
)
from .table import PAPER_TABLE6, table_markdown, table_rows

__all__ = [
    "ROOT", "PAPER_TABLE6", "LAUNCHER_KEYS",
    "CompareConfig", "StageConfig", "PretrainStageConfig", "EvaluateConfig", "StatsConfig", "FiguresConfig",
    "ResourceConfig", "LaunchConfig",
    "Run", "StageFailed", "plan", "not_recipe", "recipe_drift", "stale_reason", "move_aside", "check_plan",
    "run_local", "submit_sbatch", "wait_for_table",
    "eval_json", "evaluate_runs", "check_score", "pretrain_record", "finetune_record", "aggregate", "comparisons",
    "judge", "compared", "setting", "seed_plan", "chance_miou", "gather", "collect",
    "Summary", "Components", "Difference", "summarize", "paired_difference", "holm", "detectable_difference",
    "seeds_needed", "verdict", "format_difference",
    "table_rows", "table_markdown",
    "build_parser", "print_summary", "main",
]
