"""Table 6 end to end: ResNet50 vs ResNet50-GCN, pretrained, fine-tuned, evaluated, tabled and drawn.

    python -m experiments.compare --config configs/table6.yaml                    # run what is missing
    python -m experiments.compare --config configs/table6.yaml launch.launcher=sbatch --wait
    python -m experiments.compare --config configs/table6.yaml --collect          # gather only
    python -m experiments.compare --config configs/table6.yaml --dry-run          # show the plan

The matrix is {backbones} x {heads} (Table 6: resnet50, resnet50_gcn x baseline, gcn_br). Each
backbone is pretrained once (``backbone.train``), each (backbone, head) pair is fine-tuned from that
backbone's ``final.pth`` (``segmentation/finetune.py``), each fine-tune is evaluated
(``segmentation.evaluate``), and the results are collected. Everything lives under ``output``::

    pretrain/<backbone>/            a pretraining run directory (config.yaml, metrics.jsonl, final.pth)
    finetune/<backbone>_<head>/     a fine-tuning run directory, + eval_<split>*.json, predictions/
    table6.md, table6.json          the table (ours beside the paper's) and every figure with its source
    table6.png                      the same as a bar chart
    figure6_<backbone>.png          input | one column per head | ground truth, per image (Figure 6)
    figure3/receptive_field.png     valid receptive field of every fine-tuned network (Figure 3)
    logs/                           SLURM job logs; jobs.json: the job ids submitted per run

Finished runs (a ``final.pth``) are reused, unfinished ones resume from their last checkpoint, and
a run directory whose recorded config differs from the planned one is an error that names the
differing keys (rather than a table mixing two recipes). Launchers: ``local`` runs the stages one
after the other in subprocesses; ``sbatch`` submits one job per run with ``slurm/imagenet_pretrain.sh``
and ``slurm/segmentation_finetune.sh`` (``--dependency=afterok``: a fine-tune starts when its
backbone's pretraining has finished), then a collect job (``--collect``) after all of them.

Modules, in the order a call goes through them: ``config`` (the schema), ``plan`` (the runs, recipe
drift, the checks before anything starts), ``launch`` (local runs; SLURM jobs, ``jobs.json``, waiting),
``collect`` (evaluation, records with their sources, the files written), ``table`` (the paper's
figures, markdown), ``cli`` (``main``).
"""
from __future__ import annotations

from experiments import ROOT

from .cli import build_parser, main, print_summary
from .collect import chance_miou, collect, eval_json, evaluate_runs, finetune_record, gather, pretrain_record
from .config import CompareConfig, EvaluateConfig, FiguresConfig, LaunchConfig, ResourceConfig, StageConfig
from .launch import run_local, submit_sbatch, wait_for_table
from .plan import NOT_RECIPE, Run, StageFailed, check_plan, plan, recipe_drift
from .table import PAPER_TABLE6, table_markdown, table_rows

__all__ = [
    "ROOT", "PAPER_TABLE6", "NOT_RECIPE",
    "CompareConfig", "StageConfig", "EvaluateConfig", "FiguresConfig", "ResourceConfig", "LaunchConfig",
    "Run", "StageFailed", "plan", "recipe_drift", "check_plan",
    "run_local", "submit_sbatch", "wait_for_table",
    "eval_json", "evaluate_runs", "pretrain_record", "finetune_record", "chance_miou", "gather", "collect",
    "table_rows", "table_markdown",
    "build_parser", "print_summary", "main",
]
