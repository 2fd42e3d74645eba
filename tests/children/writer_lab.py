"""The .beton writer's fault laboratory (test_faults.py; the comment above its call there says what it does).

    python -m children.writer_lab CONFIG_JSON
"""
import ctypes
import json
import os
import random
import signal
import sys
import threading
from multiprocessing import shared_memory
from pathlib import Path

import ffcv.writer  # noqa: F401 - loaded once, before the forks
import psutil
from ffcv.reader import Reader

import backbone.write_beton as wb
from children.forked import run_forked

cfg = json.loads(sys.argv[1])
rng = random.Random(cfg["seed"])
F, G, TINY, BIG, WORK, DISK = (Path(cfg[k]) for k in ("F", "G", "tiny", "big", "work", "disk"))
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned writers become our children
SHM_LOG = WORK / "shm.log"
_init = shared_memory.SharedMemory.__init__

def _logged(self, name=None, create=False, size=0):
    _init(self, name, create, size)
    if create:
        with open(SHM_LOG, "a") as f:
            f.write(self.name + "\n")

shared_memory.SharedMemory.__init__ = _logged
MAIN = [0]  # pid of the forked command, seen by its writer and workers
TRACKER = "resource_tracker import main" + ";main("  # how multiprocessing starts its tracker (not our -c)

def descendants():
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and TRACKER not in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found

def settle():
    # wait (without CPU: a hang shows as one) until no process of the scenario is left: how each ended
    ended, names = [], {}

    def reaped(pid, status):
        if pid in names:  # resource trackers (they end by themselves) are not the scenario's processes
            ended.append([names[pid], os.waitstatus_to_exitcode(status)])

    while live := descendants():
        names.update({p.pid: f"{p.name()} {p.pid}" for p in live})
        reaped(*os.waitpid(-1, 0))
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped(pid, status)
    return ended

def shm_names():
    return SHM_LOG.read_text().split() if SHM_LOG.exists() else []

def stored(beton):
    reader = Reader(str(beton))
    names = list(reader.handlers)
    image, label = reader.metadata[f"f{names.index('image')}"], reader.metadata[f"f{names.index('label')}"]
    return [label.tolist(), image["width"].tolist(), image["height"].tolist(), image["mode"].tolist()]

REF = {}

def finished_looking_problems(folder):
    # every .beton must have its JSON, open, and hold exactly what a clean write of the JSON's source holds
    problems = []
    for beton in sorted(folder.glob("*.beton")):
        try:
            meta = wb.read_meta(beton)
            wb.check_beton(beton, meta)
            source = meta["writer"]["source"]
            if source in REF and stored(beton) != REF[source]:
                problems.append(f"{beton.name} does not hold what its JSON describes ({source})")
        except Exception as e:
            problems.append(f"{beton.name}: {type(e).__name__}: {e}")
    return problems

def scenario(name, args, inject=None, out=None):
    log = WORK / f"{name}.log"
    shm_before = len(shm_names())
    def work():
        MAIN[0] = os.getpid()
        if inject:
            inject()
        return wb.main(args)

    rc = run_forked(log, work)
    left_behind = settle()
    out = Path(out or args[args.index("--out") + 1]).parent
    shm = shm_names()[shm_before:]  # made by this scenario's writer
    result = {"name": name, "rc": rc, "log": log.read_text()[-6000:], "left_behind": left_behind,
              "files": sorted(p.name for p in out.iterdir()), "problems": finished_looking_problems(out),
              "shm_left": [n for n in shm if Path("/dev/shm", n.lstrip("/")).exists()]}
    print("RESULT", json.dumps(result), flush=True)
    return result

def write_args(data, out, *extra):
    Path(out).parent.mkdir(exist_ok=True)
    return ["--data-dir", str(data), "--out", str(out), "--num-workers", "2", "--chunk-size", "2", *extra]

# --- injections (run in the forked command, inherited by its writer process and workers) -------------
def kill_while_checking(k):
    target = wb.scan_imagefolder(F).samples[k][0]
    probe = wb.probe_image
    def probe_or_die(path):
        if path == target:
            os.kill(MAIN[0], signal.SIGKILL)
        return probe(path)
    return lambda: setattr(wb, "probe_image", probe_or_die)

def in_worker(k, action):
    def inject():
        getitem = wb.ImageFolderRGB.__getitem__
        def patched(self, index):
            if index == k:
                action()
            return getitem(self, index)
        wb.ImageFolderRGB.__getitem__ = patched
    return inject

def kill_everything():  # kill -9 of the command and its writer group: a cgroup kill, the OOM killer
    os.kill(MAIN[0], signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)

def kill_command_only(k):  # kill -9 PID of the command; every sample from k on never finishes
    def inject():
        getitem = wb.ImageFolderRGB.__getitem__
        def patched(self, index):
            if index == k:
                os.kill(MAIN[0], signal.SIGKILL)
            if index >= k:
                threading.Event().wait()
            return getitem(self, index)
        wb.ImageFolderRGB.__getitem__ = patched
    return inject

def kill_between_renames():
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        if str(dst).endswith(".json"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die

n = len(wb.scan_imagefolder(F).samples)
points = {"check": rng.randrange(n), "write": rng.randrange(n), "orphan": rng.randrange(n),
          "writer": rng.randrange(n)}
print("POINTS", json.dumps(points), flush=True)
for name, data in (("ref_F", F), ("ref_G", G)):
    r = scenario(name, write_args(data, WORK / name / "train.beton"))
    assert r["rc"] == 0, r
    REF[str(data.resolve())] = stored(WORK / name / "train.beton")

out = WORK / "out" / "train.beton"
scenario("kill_while_checking", write_args(F, out), kill_while_checking(points["check"]))
scenario("kill_while_writing", write_args(F, out), in_worker(points["write"], kill_everything))
scenario("kill_command_only", write_args(F, out), kill_command_only(points["orphan"]))
scenario("rerun", write_args(F, out))
scenario("overwrite_killed_between_renames", write_args(G, out, "--overwrite"), kill_between_renames)
scenario("rerun_overwrite", write_args(G, out, "--overwrite"))

# a worker dying on its first sample, before anything could have seen it run
scenario("worker_dies", write_args(F, WORK / "w" / "train.beton"),
         in_worker(0, lambda: os.kill(os.getpid(), signal.SIGKILL)))
scenario("writer_dies", write_args(F, WORK / "w" / "train.beton"),
         in_worker(points["writer"], lambda: os.kill(os.getppid(), signal.SIGKILL)))
raw = ["--write-mode", "raw", "--compress-probability", "0"]
scenario("disk_full", write_args(BIG, DISK / "train.beton", *raw))
filler = DISK / "filler"
filler.write_bytes(b"\0" * (8 << 20))  # 4 MiB stay free: under one 8 MiB page of ffcv's
shm_before = len(shm_names())
r = scenario("no_room_up_front", write_args(BIG, DISK / "train.beton", *raw))
print("UPFRONT", json.dumps({"new_shm": len(shm_names()) != shm_before}), flush=True)
filler.unlink()

stale = WORK / "stale"
stale.mkdir()
dead = os.fork()
if dead == 0:
    os._exit(0)
os.waitpid(dead, 0)
for name in (f".train.beton.partial-{dead}", f".train.json.partial-{dead}"):
    (stale / name).write_bytes(b"half")
scenario("stale_partials", write_args(F, stale / "train.beton"))
live = WORK / "live"
live.mkdir()
(live / f".train.beton.partial-{os.getpid()}").write_bytes(b"someone else's")  # this lab is alive
scenario("partial_of_a_live_writer", write_args(F, live / "train.beton"))

scenario("tiny_images_refused", write_args(TINY, WORK / "tiny" / "train.beton"))
scenario("tiny_images_skipped", write_args(TINY, WORK / "tiny" / "train.beton", "--skip-bad"))
print("TINY", json.dumps(wb.read_meta(WORK / "tiny" / "train.beton") if (WORK / "tiny" / "train.beton").exists()
                         else None), flush=True)
# a kill of everything (command and writer group) leaves ffcv's shared memory behind: nobody is left to remove it
leaked = [n for n in shm_names() if Path("/dev/shm", n.lstrip("/")).exists()]
for n in leaked:
    Path("/dev/shm", n.lstrip("/")).unlink()
print("LEAKED", json.dumps(leaked), flush=True)
