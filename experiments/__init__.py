"""What drives both stages: the Table 6 comparison, the demo, the figures, the receptive-field tool, the shapes data.

``compare/`` (the comparison runner, ``python -m experiments.compare``), ``demo.py`` (Table 6 at toy
scale), ``figures.py`` (Table 6 chart, Figure 6), ``receptive_field/`` (Figure 3, ``python -m
experiments.receptive_field``), ``imaging.py`` (what the pictures share), ``shapes.py`` (the demo's
procedural data set). Importing this package imports nothing heavy: ``experiments.shapes`` stays free
of timm and the stages' models.
"""
from pathlib import Path

# The repository: the stage entry points (segmentation/finetune.py), slurm/ and configs/ are found from here,
# whatever the working directory.
ROOT = Path(__file__).resolve().parents[1]
