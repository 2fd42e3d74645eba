"""The fine-tune's fault laboratory (test_faults.py; the comment above its call there says what it does).

    python -m children.finetune_lab CONFIG_JSON
"""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from children.forked import run_forked
from engine import checkpoint as ckpt
from segmentation import finetune

cfg = json.loads(sys.argv[1])
rng = random.Random(cfg["seed"])
WORK = Path(cfg["work"])
COMMON = ["--config", cfg["config"], f"data.root={cfg['devkit']}", "train.iterations=10", "eval.every=0",
          "run.checkpoint_every=2", "run.check_every_steps=1", "data.global_batch=2", "data.crop_size=32"]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0

class DieAfter:  # the file torch.save writes to, killing the process once ``left`` bytes went through
    def __init__(self, f, left):
        self.f, self.left = f, left
    def write(self, b):
        if len(b) >= self.left:
            self.f.write(bytes(b)[:self.left])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()
        self.left -= len(b)
        return self.f.write(b)
    def flush(self):
        self.f.flush()

# --- injections: each returns what to do in the forked process before the command runs -------------------
def kill_in_torch_save(kind, at_step, share):
    def inject():
        save = torch.save
        def save_or_die(obj, f, *a, **k):
            mine = (kind == "checkpoint" and "optimizer" in obj and obj["step"] >= at_step) or \
                   (kind == "final" and "state_dict" in obj)
            return save(obj, DieAfter(f, max(1, int(share * tensor_bytes(obj)))) if mine else f, *a, **k)
        torch.save = save_or_die
    return inject

def kill_before_replace(at_step):
    def inject():
        replace = os.replace
        def replace_or_die(src, dst):
            m = ckpt.CHECKPOINT_RE.match(Path(dst).name)
            if m and int(m.group(1)) >= at_step:
                die()  # the temporary file is complete and synced; the checkpoint is not there yet
            return replace(src, dst)
        os.replace = replace_or_die
    return inject

def kill_in_rotation():
    unlink = pathlib.Path.unlink
    def unlink_or_die(self, *a, **k):
        if ckpt.CHECKPOINT_RE.match(self.name):
            die()  # the new checkpoint is in place, the oldest not yet removed
        return unlink(self, *a, **k)
    pathlib.Path.unlink = unlink_or_die

def in_step(at_step, action):
    def inject():
        train_step = finetune.Finetuner.train_step
        def patched(self, micro_batches, lr):
            if self.loop.step + 1 == at_step:
                action(self)
            return train_step(self, micro_batches, lr)
        finetune.Finetuner.train_step = patched
    return inject

def signals(*sigs):
    def send(trainer):
        for sig in sigs:  # as a user or SLURM would, in the middle of a step
            os.kill(os.getpid(), sig)
    return send

def die_before_update(trainer):
    trainer.optimizer.step = die  # after the forward and backward passes of the step, before the update

def in_fake_slurm_job():
    os.environ["SLURM_JOB_ID"] = "4242"
    os.environ["PATH"] = f"{WORK / 'bin'}:{os.environ['PATH']}"  # a scontrol that accepts the requeue

(WORK / "bin").mkdir(exist_ok=True)
(WORK / "bin" / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {WORK / 'scontrol.log'}\n")
(WORK / "bin" / "scontrol").chmod(0o755)

s1 = rng.choice([2, 4])  # the first checkpoint to die in
points = {"checkpoint_killed_in_torch_save": s1, "share_written": round(rng.uniform(0.05, 0.95), 3),
          "sigterm_in_step": s1 + 1, "sigusr1_in_step": s1 + 3, "sigint_in_step": s1 + 4,
          "killed_in_step": s1 + 5 + rng.randint(0, 1), "final_share_written": round(rng.uniform(0.05, 0.95), 3)}
print("POINTS", json.dumps(points), flush=True)

def snapshot(run_dir):
    out = {"files": sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else [], "checkpoints": {}}
    for p in ckpt.list_checkpoints(run_dir):
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
            out["checkpoints"][p.name] = {"step": state["step"],
                                          "nonfinite": ckpt.nonfinite_tensors(state["model"])}
        except Exception as e:
            out["checkpoints"][p.name] = {"error": f"{type(e).__name__}: {e}"}
    final = run_dir / "final.pth"
    if final.exists():
        try:
            out["final"] = {"nonfinite": ckpt.nonfinite_tensors(torch.load(final, weights_only=True)["state_dict"])}
        except Exception as e:
            out["final"] = {"error": f"{type(e).__name__}: {e}"}
    return out

def stage(name, run_dir, *injections):
    log = WORK / f"{name}.log"
    def work():
        for inject in injections:
            inject()
        return finetune.main(COMMON + [f"run.dir={run_dir}"])

    rc = run_forked(log, work)
    result = {"name": name, "rc": rc, "log": log.read_text()[-5000:],
              **snapshot(run_dir)}
    print("RESULT", json.dumps(result), flush=True)

STRAIGHT, RUN = WORK / "straight", WORK / "run"
stage("straight", STRAIGHT)
stage("kill_in_torch_save", RUN, kill_in_torch_save("checkpoint", s1, points["share_written"]))
stage("kill_before_replace", RUN, kill_before_replace(s1))
stage("sigterm", RUN, in_step(points["sigterm_in_step"], signals(signal.SIGTERM)))
stage("kill_in_rotation", RUN, kill_in_rotation)
stage("sigusr1_in_slurm", RUN, in_fake_slurm_job, in_step(points["sigusr1_in_step"], signals(signal.SIGUSR1)))
stage("sigint_twice", RUN, in_step(points["sigint_in_step"], signals(signal.SIGINT, signal.SIGINT)))
stage("sigint", RUN, in_step(points["sigint_in_step"], signals(signal.SIGINT)))
stage("kill_in_training", RUN, in_step(points["killed_in_step"], die_before_update))
stage("kill_in_final_save", RUN, kill_in_torch_save("final", 0, points["final_share_written"]))
stage("finish", RUN)
if cfg["disk"]:  # a run directory on a 110 MiB disk: the third checkpoint (41 MiB each, 2 kept) does not fit
    disk = Path(cfg["disk"])
    stage("disk_full", disk / "run")
    subprocess.run(["mount", "-o", "remount,size=240m", str(disk)], check=True)  # space freed
    stage("disk_full_resumed", disk / "run")
