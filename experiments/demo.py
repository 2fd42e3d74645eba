"""The demo: the paper's Table 6 at toy scale, from nothing to the table and the figures.

    python -m experiments.demo                      # everything on this machine (make demo)
    python -m experiments.demo --launcher sbatch    # the training runs as SLURM jobs (make demo LAUNCHER=sbatch)

1. writes the embedded shapes data set (``experiments.shapes``) under ``--data``: ImageNet folder
   layout, VOCdevkit and SBD;
2. writes its ImageNet half to ``train.beton`` / ``val.beton`` (``backbone.write_beton``);
3. runs the comparison of ``configs/demo.yaml`` (``experiments.compare``): pretraining of ResNet50
   and ResNet50-GCN, four fine-tunes (baseline and GCN + BR heads), evaluation, ``table6.md``,
   the bar chart, Figure 6 and Figure 3;
4. prints each network's mIoU beside chance (background everywhere) and says whether it learned.

Every step reuses what an earlier call finished, so running it again only redraws the table.
With ``--launcher sbatch`` a SLURM cluster must answer (``sudo bash slurm/local/start.sh`` starts
the single-node one the tests use); the demo then submits the jobs, waits, and prints the same.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.logs import setup_logging

from . import ROOT
from .compare import main as compare_main
from .shapes import ShapesSpec, write_shapes

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
BETON_MAX_RESOLUTION = 96  # the images are 64-88 px: stored as they are
# "learned" = mIoU at least this many times chance and this many points above it
LEARNED_RATIO, LEARNED_MARGIN = 2.0, 20.0


def write_betons(data: Path) -> dict[str, Path]:
    """``data/{train,val}.beton`` from ``data/imagenet/{train,val}``, unless newer than the images."""
    from backbone.write_beton import WriterSettings, write_beton

    out = {}
    stamp = (data / "shapes.json").stat().st_mtime
    for split in ("train", "val"):
        beton = data / f"{split}.beton"
        if not (beton.exists() and beton.with_suffix(".json").exists() and beton.stat().st_mtime >= stamp):
            info = write_beton(data / "imagenet" / split, beton, WriterSettings(max_resolution=BETON_MAX_RESOLUTION),
                               num_workers=2, overwrite=True)
            print(f"  {beton}: {info.get('num_images', '?')} images, {info.get('num_classes', '?')} classes")
        out[split] = beton
    return out


def check_slurm() -> None:
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        raise SystemExit("error: --launcher sbatch needs a SLURM cluster, and none answers (sinfo failed). Start "
                         "the local one with `sudo bash slurm/local/start.sh`, or run the demo without --launcher")


def verdict(output: Path) -> bool:
    """Print each fine-tune's mIoU against chance; True when every GCN + BR network learned the task."""
    result = json.loads((output / "table6.json").read_text())
    chance = result.get("chance_miou") or 0.0
    print(f"\nsegmentation mIoU on the shapes validation split (chance, background everywhere: {chance:.1f}%):")
    ok = True
    for name, rec in result["segmentation"].items():
        if rec is None:
            print(f"  {name:<24} not finished")
            ok = False
            continue
        learned = rec["miou"] >= max(LEARNED_RATIO * chance, chance + LEARNED_MARGIN)
        print(f"  {name:<24} {rec['miou']:5.1f}%  ({rec['miou'] / max(chance, 1e-9):.1f}x chance)"
              f"  {'learned' if learned else 'NOT above chance'}")
        ok &= learned or not name.endswith("+gcn_br")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--launcher", choices=("local", "sbatch"), default="local",
                   help="local: subprocesses on this machine; sbatch: SLURM jobs with dependencies")
    p.add_argument("--data", type=Path, default=Path("data/shapes"), help="where the shapes data set goes")
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="the comparison's folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes data set")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="more overrides of configs/demo.yaml (python -m experiments.compare --help)")
    args = p.parse_args(argv)
    setup_logging()
    if args.launcher == "sbatch":
        check_slurm()
    t0 = time.monotonic()
    data, output = args.data.resolve(), args.output.resolve()
    print(f"== 1. shapes data set (seed {args.seed}) -> {data}", flush=True)
    write_shapes(data, ShapesSpec(seed=args.seed))
    print(f"== 2. .beton files ({time.monotonic() - t0:.0f} s)", flush=True)
    betons = write_betons(data)
    print(f"== 3. Table 6 at toy scale: configs/demo.yaml, {args.launcher} ({time.monotonic() - t0:.0f} s)",
          flush=True)
    overrides = [
        f"output={output}",
        f"pretrain.overrides=[data.train={betons['train']}, data.val={betons['val']}]",
        f"finetune.overrides=[data.root={data / 'VOCdevkit'}, data.sbd_root={data / 'benchmark_RELEASE'}]",
        *args.overrides,
    ]
    rc = compare_main(["--config", str(DEMO_CONFIG), "--launcher", args.launcher,
                       *(["--wait"] if args.launcher == "sbatch" else []), *overrides])
    if rc != 0:
        return rc
    ok = verdict(output)
    minutes = (time.monotonic() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min; table, chart and figures in {output}")
    if not ok:
        print("error: a GCN + BR network did not get above chance; see its train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
