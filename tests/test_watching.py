"""Watching a run: TensorBoard scalars, curves.png, throughput / data wait / MFU, and the GPU check's
no-GPU exit; the CUDA defects that can be reproduced on the CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.complexity import TrainFlops, device_peak_flops, mfu
from engine.curves import draw_curves
from engine.logs import MetricsWriter, read_metrics
from engine.loop import Throughput

ROOT = Path(__file__).resolve().parents[1]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", names={"per_class_iou": ["background", "cat"]})
    writer.write(kind="train", step=10, loss=0.5, lr=0.1, img_per_s=123.0, data_wait=0.25, mfu=None)
    writer.write(kind="val", step=20, miou=0.6, per_class_iou=[0.9, None], images=7)
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["train", "val"] and records[0]["mfu"] is None
    scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == [(10, 0.5)] and scalars["train/img_per_s"] == [(10, 123.0)]
    assert scalars["val/miou"] == [(20, pytest.approx(0.6))]
    assert scalars["val/per_class_iou/background"] == [(20, pytest.approx(0.9))]
    assert "val/per_class_iou/cat" not in scalars and "train/mfu" not in scalars  # no value, no point


def test_curves_png_from_metrics(tmp_path: Path) -> None:
    assert draw_curves({"empty": tmp_path}, tmp_path / "curves.png") is None  # nothing to draw yet
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        writer = MetricsWriter(run / "metrics.jsonl", tensorboard=False)
        for step in range(1, 6):
            writer.write(kind="train", step=step, loss=scale / step)
        writer.write(kind="val", step=5, miou=0.5 / scale)
    path = draw_curves({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "curves.png", "two runs")
    with Image.open(path) as im:
        assert im.size[0] > 600 and im.size[1] > 250
    assert not list(tmp_path.glob(".*.tmp.png"))


def test_throughput_data_wait_and_mfu_by_hand() -> None:
    # 1000 images on each of 2 processes in 10 s, 1 s of it waiting for data; 3 GFLOPs per image
    # against a 1 TFLOP/s device: 100 img/s x 3e9 = 3e11 FLOP/s = 30 % of the peak
    speed = Throughput(images=1000, seconds=10.0, data_wait_s=1.0, world_size=2, flops=1000 * 3e9, peak_flops=1e12)
    assert speed.per_process == pytest.approx(100) and speed.total == pytest.approx(200)
    assert speed.data_wait == pytest.approx(0.1) and speed.mfu == pytest.approx(0.3)
    assert speed.line("GPU") == "100.0 img/s per GPU (200.0 in all), data wait 10 %, MFU 30 %"
    assert mfu(3e9, 100, 1e12) == pytest.approx(0.3) and mfu(3e9, 100, None) is None
    cpu = Throughput(images=50, seconds=5.0, data_wait_s=0.0, world_size=1, flops=0.0, peak_flops=None)
    assert cpu.mfu is None and cpu.record()["mfu"] is None and "MFU n/a" in cpu.line("process")


def test_device_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_peak_flops(torch.device("cpu")) is None
    for name, tflops in (("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                         ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        peak = device_peak_flops(torch.device("cuda", 0))
        assert peak == (None if tflops is None else pytest.approx(tflops * 1e12)), name


def test_train_flops_count_forward_and_backward() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16, 10))
    with FlopCounterMode(display=False) as forward:
        model(torch.zeros(1, 3, 16, 16))
    count = TrainFlops(model)
    flops = count(3, 16, 16)
    # backward: the weight gradients of both layers and the input gradient of the second (not of the image)
    conv, linear = 2 * 8 * 3 * 9 * 256, 2 * 8 * 16 * 10
    assert forward.get_total_flops() == conv + linear and flops == (conv + linear) + (conv + 2 * linear)
    assert count(3, 16, 16) == flops and count(3, 8, 8) < flops  # per size, counted once
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself untouched


def test_gpu_check_without_a_gpu_says_so_and_exits_2() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run make gpu-check")
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no GPU" in proc.stderr


def test_gpu_check_throughput_table() -> None:
    from experiments.gpu_check import format_throughput

    rows = [{"backbone": "resnet50", "resolution": 224, "img_per_s": 3000.0, "data_wait": 0.03, "mfu": 0.38},
            {"backbone": "resnet50_gcn", "resolution": 224, "img_per_s": 2850.0, "data_wait": 0.04, "mfu": None}]
    table = format_throughput(rows)
    assert "3,000" in table and "38 %" in table and "n/a" in table
    assert "resnet50_gcn / resnet50 at 224 px (channels_last): 0.95x" in table


# --- the CUDA defects, on their CPU-reproducible side ---------------------------------------------------
def test_deterministic_segmentation_loss_equals_cross_entropy() -> None:
    from segmentation.finetune import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    masks = torch.randint(0, 5, (2, 6, 7))
    masks[0, :2] = 255  # void
    plain = segmentation_loss(logits, masks, deterministic=False)
    (g_plain,) = torch.autograd.grad(plain, logits)
    one_hot = segmentation_loss(logits, masks, deterministic=True)
    (g_one_hot,) = torch.autograd.grad(one_hot, logits)
    torch.testing.assert_close(one_hot, plain)
    torch.testing.assert_close(g_one_hot, g_plain)
    assert float(segmentation_loss(logits.detach(), torch.full_like(masks, 255), deterministic=True)) == 0.0


def test_deterministic_mode_sets_the_cublas_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.runner import set_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        set_deterministic(True)
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_deterministic(before)


def test_flip_logits_are_summed_in_fp32() -> None:
    from backbone.evaluate import tta_logits

    class Half(torch.nn.Module):  # what a network under bf16 autocast returns
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).to(torch.bfloat16)

    x = torch.tensor([[[[1.0, 1 / 512]]]])  # 1 + 1/512 exists in fp32, not in bf16
    assert tta_logits(Half(), x, flip=True).dtype == torch.float32
    assert float(tta_logits(Half(), x, flip=True)[0, 0]) == 1 + 1 / 512


def test_gpu_pipeline_uses_ffcv_normalize_only_with_both_of_its_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from backbone import data

    real_import = builtins.__import__

    def no_pfn(name, *args, **kwargs):
        if name == "pytorch_pfn_extras":
            raise ImportError("simulated: cupy is there, pytorch_pfn_extras is not")
        if name == "cupy":
            return object()
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pfn)
    assert data.ffcv_gpu_normalize_available() is False
    op = data._gpu_normalize(torch.float32)
    assert isinstance(op, data.TorchNormalize) and op.dtype == torch.float32  # an fp32 model gets fp32 batches
