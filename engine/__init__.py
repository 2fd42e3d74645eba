"""Run infrastructure shared by ImageNet pretraining and segmentation fine-tuning.

One module per concern: ``config`` (typed YAML configs with ``key=value`` overrides),
``distributed`` (rank/world from torchrun or SLURM, process groups), ``checkpoint`` (atomic
checkpoints, resume, RNG state), ``logs`` (JSON-lines metrics, progress), ``preemption``
(SLURM signals -> checkpoint -> requeue). Nothing here knows about ImageNet.
"""
