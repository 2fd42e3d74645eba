"""Parameter counts of the score-map modules next to the paper's Tables 2 and 4, and whole-network costs.

    python -m segmentation.report            # readable tables
    python -m segmentation.report --json     # the same figures as JSON

Module counts are for one module on res-5 (2048 channels in, 21 classes, no bias), as in the
paper. The paper prints thousands, truncated in one place (GCN k=3: 260,694 -> "260K") and rounded
in another (Conv k=9: 3,483,648 -> "3484K"), so a count matches when either reading gives the
paper's figure. Whole-network MACs come from ``torch.utils.flop_counter`` (MACs = FLOPs / 2) on
the meta device: nothing is allocated, so even the 300M-parameter stack head costs nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.complexity import count_params

from .heads import GCN as GCNModule
from .heads import HEADS, ConvScore, ConvStack
from .network import build_segmentation_model

__all__ = [
    "PAPER_TABLE2",
    "PAPER_TABLE4",
    "matches_paper",
    "table2",
    "table4",
    "network_costs",
    "main",
]

RES5_CHANNELS = 2048
VOC_CLASSES = 21
# Thousands of parameters, as printed in the paper.
PAPER_TABLE2 = {"gcn": {3: 260, 5: 434, 7: 608, 9: 782}, "conv": {3: 387, 5: 1075, 7: 2107, 9: 3484}}
PAPER_TABLE4 = {"stack m=2048": 75885, "stack m=1024": 28505, "stack m=210": 4307, "gcn": 608}
TABLE4_KERNEL = 7
DEFAULT_BACKBONES = ("resnet50", "resnet50_gcn")


def matches_paper(count: int, paper_thousands: int) -> bool:
    """True when the paper's figure is ``count`` in thousands, truncated or rounded."""
    return paper_thousands in (count // 1000, round(count / 1000))


def _count_on_meta(make) -> int:
    with torch.device("meta"):
        return count_params(make())


def table2() -> list[dict]:
    """Table 2: GCN vs a plain kxk conv on res-5, k = 3, 5, 7, 9."""
    rows = []
    for k in PAPER_TABLE2["gcn"]:
        gcn = _count_on_meta(lambda k=k: GCNModule(RES5_CHANNELS, VOC_CLASSES, k))
        conv = _count_on_meta(lambda k=k: ConvScore(RES5_CHANNELS, VOC_CLASSES, k))
        rows.append({
            "k": k,
            "gcn_params": gcn,
            "gcn_paper_k": PAPER_TABLE2["gcn"][k],
            "gcn_match": matches_paper(gcn, PAPER_TABLE2["gcn"][k]),
            "conv_params": conv,
            "conv_paper_k": PAPER_TABLE2["conv"][k],
            "conv_match": matches_paper(conv, PAPER_TABLE2["conv"][k]),
        })
    return rows


def table4() -> list[dict]:
    """Table 4: a k=7 stack of three 3x3 convs with m intermediate channels vs GCN k=7, on res-5."""
    makers = {
        f"stack m={m}": (lambda m=m: ConvStack(RES5_CHANNELS, VOC_CLASSES, TABLE4_KERNEL, mid_chs=m))
        for m in (2048, 1024, 210)
    }
    makers["gcn"] = lambda: GCNModule(RES5_CHANNELS, VOC_CLASSES, TABLE4_KERNEL)
    rows = []
    for name, make in makers.items():
        n = _count_on_meta(make)
        rows.append({"module": name, "params": n, "paper_k": PAPER_TABLE4[name],
                     "match": matches_paper(n, PAPER_TABLE4[name])})
    return rows


def network_costs(
    backbones: Iterable[str] = DEFAULT_BACKBONES,
    heads: Iterable[str] = HEADS,
    size: int = 512,
    kernel_size: int = 15,
    num_classes: int = VOC_CLASSES,
) -> list[dict]:
    """Parameters and MACs (one image of ``size`` x ``size``) of the whole network, and of its decoder."""
    rows = []
    for backbone in backbones:
        for head in heads:
            with torch.device("meta"):
                model = build_segmentation_model(backbone, head, num_classes, kernel_size).eval()
                x = torch.empty(1, 3, size, size)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
            per_module = counter.get_flop_counts()
            total = counter.get_total_flops() // 2
            encoder = sum(per_module.get(f"{type(model).__name__}.encoder", {}).values()) // 2
            params = count_params(model)
            rows.append({
                "backbone": backbone,
                "head": head,
                "kernel_size": kernel_size,
                "params": params,
                "decoder_params": params - count_params(model.encoder),
                "gmacs": total / 1e9,
                "decoder_gmacs": (total - encoder) / 1e9,
            })
    return rows


def _cell(value, spec: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def _format(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Aligned text table; ``columns`` holds (key, title, format spec)."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([_cell(row[key], spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m segmentation.report",
        description="Score-map parameter counts vs the paper's Tables 2 and 4 (one module on res-5: 2048 "
        "channels in, 21 classes, no bias), and each network's parameters and MACs.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), metavar="NAME",
                   help="timm backbones for the network table (default: %(default)s)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS, metavar="HEAD",
                   help=f"heads for the network table, from {', '.join(HEADS)} (default: all)")
    p.add_argument("--size", type=int, default=512, help="square input size for MACs (default: %(default)s)")
    p.add_argument("--kernel-size", type=int, default=15,
                   help="k of the network's heads (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=VOC_CLASSES, help="classes (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    result = {
        "table2": table2(),
        "table4": table4(),
        "network": network_costs(args.backbones, args.heads, args.size, args.kernel_size, args.num_classes),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("Table 2: one module on res-5 (2048 -> 21 channels, no bias); paper figures in thousands")
    print(_format(result["table2"], [
        ("k", "k", "d"), ("gcn_params", "GCN params", ",d"), ("gcn_paper_k", "paper (K)", "d"),
        ("gcn_match", "match", ""), ("conv_params", "Conv params", ",d"), ("conv_paper_k", "paper (K)", "d"),
        ("conv_match", "match", ""),
    ]))
    print(f"\nTable 4: k={TABLE4_KERNEL}, stack = 3x3 convs 2048 -> m -> m -> 21 vs GCN")
    print(_format(result["table4"], [
        ("module", "module", "s"), ("params", "params", ",d"), ("paper_k", "paper (K)", "d"),
        ("match", "match", ""),
    ]))
    print(f"\nWhole network, {args.num_classes} classes, k={args.kernel_size}, "
          f"one {args.size}x{args.size} image (stack: m = each stage's channels)")
    print(_format(result["network"], [
        ("backbone", "backbone", "s"), ("head", "head", "s"), ("params", "params", ",d"),
        ("decoder_params", "decoder params", ",d"), ("gmacs", "GMACs", ".2f"),
        ("decoder_gmacs", "decoder GMACs", ".2f"),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
