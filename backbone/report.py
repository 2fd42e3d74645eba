"""Params and MACs per stage of ResNet50 and ResNet50-GCN: the project's Table 11.

    python -m backbone.report                      # resnet50 vs resnet50_gcn at 224x224
    python -m backbone.report resnet50_gcn --json  # machine-readable
"""
from __future__ import annotations

import argparse
import json
import sys

import timm

from backbone.models import create_backbone
from engine.complexity import count_params, macs_by_module

# Table 11's rows, as module paths of timm's ResNet.
STAGES = (("conv1", ("conv1", "bn1")), ("res-2", ("layer1",)), ("res-3", ("layer2",)),
          ("res-4", ("layer3",)), ("res-5", ("layer4",)), ("classifier", ("fc",)))
PAPER_MFLOPS = {"resnet50": 3700, "resnet50_gcn": 3700}  # Table 11, last row


def model_report(name: str, resolution: int = 224, anti_aliasing: str | None = "blurpool") -> dict:
    """Params and MACs of every stage, every res-4/res-5 block, and the whole model, built as pretraining
    trains it (``anti_aliasing='blurpool'``: the blur before each strided conv is counted too)."""
    model = create_backbone(name, anti_aliasing=anti_aliasing)
    macs = macs_by_module(model, (1, 3, resolution, resolution))
    modules = dict(model.named_modules())

    def part(paths: tuple[str, ...]) -> dict:
        return {"params": sum(count_params(modules[p]) for p in paths if p in modules),
                "macs": sum(macs.get(p, 0) for p in paths)}

    blocks = {f"{stage}.{i}": {"type": type(block).__name__, "params": count_params(block),
                               "macs": macs.get(f"{stage}.{i}", 0)}
              for stage in ("layer3", "layer4") for i, block in enumerate(modules[stage])}
    return {
        "model": name,
        "resolution": resolution,
        "stages": {label: part(paths) for label, paths in STAGES},
        "blocks": blocks,
        "total": {"params": count_params(model), "macs": macs[""]},
        "paper_mflops": PAPER_MFLOPS.get(name),
        "anti_aliasing": anti_aliasing,
    }


def format_table(reports: list[dict]) -> str:
    names = [r["model"] for r in reports]
    head = f"{'component':12s}" + "".join(f" {n + ' params':>22s} {n + ' GMACs':>20s}" for n in names)
    aa = reports[0]["anti_aliasing"]
    lines = [f"Params and MACs at {reports[0]['resolution']}x{reports[0]['resolution']} "
             f"(torch.utils.flop_counter; convolutions and fc only; anti-aliasing: {aa or 'none'}, as "
             f"{'trained' if aa else 'without the recipe'})", head, "-" * len(head)]
    for label, _ in STAGES + (("total", ()),):
        row = f"{label:12s}"
        for r in reports:
            cell = r["total"] if label == "total" else r["stages"][label]
            row += f" {cell['params'] / 1e6:21.2f}M {cell['macs'] / 1e9:20.3f}"
        lines.append(row)
    paper = "  ".join(f"{r['model']}: {r['paper_mflops']} MFlops" for r in reports if r["paper_mflops"])
    if paper:
        lines.append(f"paper (Table 11, conv MFlops i.e. MACs): {paper}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backbone.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["resnet50", "resnet50_gcn"], help="timm model names")
    ap.add_argument("--resolution", type=int, default=224, help="square input size (default 224)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--anti-aliasing", choices=("blurpool", "none"), default="blurpool",
                    help="count the networks as pretraining trains them (blurpool, default) or without the blur")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; e.g. resnet50, resnet50_gcn (see timm.list_models())")
    aa = None if args.anti_aliasing == "none" else args.anti_aliasing
    reports = [model_report(m, args.resolution, aa) for m in args.models]
    print(json.dumps(reports, indent=2) if args.json else format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
