"""The demo: the paper's Table 6 at toy scale, from nothing to the table and the figures.

    python -m experiments.demo                      # everything on this machine (make demo)
    python -m experiments.demo --launcher sbatch    # the training runs as SLURM jobs (make demo LAUNCHER=sbatch)

1. writes the embedded shapes data set (``experiments.shapes``) under ``--data``: ImageNet folder
   layout, VOCdevkit and SBD;
2. writes its ImageNet half to ``train.beton`` / ``val.beton`` (``backbone.write_beton``);
3. runs the comparison of ``configs/demo.yaml`` (``experiments.compare``): pretraining of ResNet50
   and ResNet50-GCN (once each, seed 0), each fine-tuned with the baseline and the GCN + BR heads once
   per seed (2 seeds), evaluation, ``table6.md`` with mean ± sd over seeds and every comparison's
   interval and verdict, the bar chart with error bars, the per-image difference figure, Figure 6
   and Figure 3;
4. prints each network's mIoU beside chance (background everywhere) and says whether it learned,
   then the comparisons.

Every step reuses what an earlier call finished (decided by content: the ``.beton`` files by the
writer settings and source they record and the hash of ``shapes.json``), so running it again only
redraws the table.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.config import OverridesParser, load_config
from engine.logs import setup_logging
from engine.provenance import file_sha256

from . import ROOT
from .compare import CompareConfig
from .compare import main as compare_main
from .shapes import ShapesSpec, write_shapes

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
BETON_MAX_RESOLUTION = 96  # the images are 64-88 px: stored as they are
BETON_STAMP = "betons.json"  # per split: the shapes.json and the .beton metadata it was written from
# "learned" = mIoU at least this many times chance and this many points above it
LEARNED_RATIO, LEARNED_MARGIN = 2.0, 20.0


def beton_is_current(beton: Path, source: Path, settings: Any, stamp: dict[str, Any] | None, shapes_sha256: str) \
        -> bool:
    """The .beton was written from ``source`` with ``settings`` (its JSON says so) while ``shapes.json`` had
    the hash ``shapes_sha256`` (the stamp, tied to that very JSON by its hash, says so)."""
    from backbone.write_beton import meta_path

    meta = meta_path(beton)
    if not (beton.exists() and meta.exists() and stamp):
        return False
    writer = json.loads(meta.read_text()).get("writer", {})
    same_writer = all(writer.get(k) == v for k, v in asdict(settings).items()) and \
        writer.get("source") == str(source.resolve())
    return same_writer and stamp.get("shapes_sha256") == shapes_sha256 and \
        stamp.get("meta_sha256") == file_sha256(meta)


def write_betons(data: Path) -> dict[str, Path]:
    """``data/{train,val}.beton`` from ``data/imagenet/{train,val}``, unless written before from the same
    images (the same ``shapes.json``, by hash) with the same writer settings."""
    from backbone.write_beton import WriterSettings, meta_path, write_beton

    settings = WriterSettings(max_resolution=BETON_MAX_RESOLUTION)
    shapes_sha256 = file_sha256(data / "shapes.json")
    stamp_path = data / BETON_STAMP
    stamps = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    out = {}
    for split in ("train", "val"):
        beton, source = data / f"{split}.beton", data / "imagenet" / split
        if not beton_is_current(beton, source, settings, stamps.get(split), shapes_sha256):
            info = write_beton(source, beton, settings, num_workers=2, overwrite=True)
            stamps[split] = {"shapes_sha256": shapes_sha256, "meta_sha256": file_sha256(meta_path(beton))}
            stamp_path.write_text(json.dumps(stamps, indent=1) + "\n")
            print(f"  {beton}: {info.get('num_images', '?')} images, {info.get('num_classes', '?')} classes")
        out[split] = beton
    return out


def seeds_note(result: dict[str, Any]) -> str:
    """Which stages ran once per seed, and what the spread and the intervals therefore hold."""
    seeds, pre = result.get("seeds", [0]), result.get("pretrain_seeds", result.get("seeds", [0]))
    if pre == seeds:
        return (f"Seeds: every pretraining and every fine-tune ran with seeds {seeds}; the spread and the intervals "
                "hold both stages' seed-to-seed variation and the choice of validation images.")
    return (f"Seeds: each backbone was pretrained with seed(s) {pre} only and each fine-tune ran with seeds {seeds} "
            "(configs/demo.yaml: pretrain.seeds, seeds), to stay within 15 minutes on 2 CPU cores; the spread and "
            "the intervals hold fine-tuning's seed-to-seed variation and the choice of validation images, not "
            "pretraining's, so a backbone comparison's verdict holds for this pretraining only: it compares two "
            "weight files, not two architectures (configs/table6.yaml runs every stage once per seed). ffcv's crop "
            "and flip augmentation in pretraining is not seeded (numba's per-thread generators).")


def with_paths(overrides: Sequence[str], paths: dict[str, str]) -> str:
    """A stage's override list (``[k=v, ...]``) from the config's, with the data paths set to ``paths``."""
    kept = [o for o in overrides if o.split("=", 1)[0] not in paths]
    return "[" + ", ".join([*(f"{k}={v}" for k, v in paths.items()), *kept]) + "]"


def check_slurm() -> None:
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        raise SystemExit("error: --launcher sbatch needs a SLURM cluster, and none answers (sinfo failed). Start "
                         "the local one with `sudo bash slurm/local/start.sh`, or run the demo without --launcher")


def verdict(output: Path) -> bool:
    """Print each fine-tune's mIoU (mean over seeds) against chance, then every comparison with its interval
    and verdict; True when every GCN + BR network learned the task."""
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
        sd = (rec.get("std") or {}).get("miou")
        spread = f" ± {sd:.1f}" if sd is not None else ""
        print(f"  {name:<24} {rec['miou']:5.1f}%{spread} (n={rec.get('n', 1)}, {rec['miou'] / max(chance, 1e-9):.1f}x"
              f" chance)  {'learned' if learned else 'NOT above chance'}")
        ok &= learned or not name.endswith("+gcn_br")
    comparisons = result.get("comparisons") or []
    if comparisons:
        st = result.get("stats") or {}
        conf = round(100 * st.get("confidence", 0.95))
        size = (st.get("family") or {}).get("size", len(comparisons))
        print(f"\ndifferences in mIoU points (B - A), {conf} % interval, verdict (Holm over {size} comparisons):")
        for c in comparisons:
            print(f"  {c['label']:<44} {c['text']}")
            if c.get("detectable") is not None:
                print(f"  {'':<44} detectable with these seeds: >= {c['detectable']:.1f} points")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    p = OverridesParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0],
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
    t_setup = time.monotonic()
    print(f"== 3. Table 6 at toy scale: configs/demo.yaml, {args.launcher} ({t_setup - t0:.0f} s)", flush=True)
    demo = load_config(CompareConfig, DEMO_CONFIG)  # its stage overrides stay; the data paths are this call's
    overrides = [
        f"output={output}",
        "pretrain.overrides=" + with_paths(demo.pretrain.overrides, {"data.train": str(betons["train"]),
                                                                     "data.val": str(betons["val"])}),
        "finetune.overrides=" + with_paths(demo.finetune.overrides, {"data.root": str(data / "VOCdevkit"),
                                                                     "data.sbd_root": str(data / "benchmark_RELEASE")}),
        *args.overrides,
    ]
    rc = compare_main(["--config", str(DEMO_CONFIG), "--launcher", args.launcher,
                       *(["--wait"] if args.launcher == "sbatch" else []), *overrides])
    if rc != 0:
        return rc
    ok = verdict(output)
    end = time.monotonic()
    print(f"\n{seeds_note(json.loads((output / 'table6.json').read_text()))}")
    print(f"\ndemo finished in {(end - t0) / 60:.1f} min ({(t_setup - t0) / 60:.1f} min data and .beton files, "
          f"{(end - t_setup) / 60:.1f} min training, evaluation, table and figures); table, chart and figures in "
          f"{output}")
    if not ok:
        print("error: a GCN + BR network did not get above chance; see its train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
