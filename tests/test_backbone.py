"""ResNet50-GCN: structure (Table 11), cost, timm conformance, weight loading and its errors."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import backbone
from backbone.artifacts import WEIGHTS_FORMAT
from backbone.gcn_block import GCNBlock, bottleneck_macs_per_pixel, gcn_macs_per_pixel, matched_branch_width
from backbone.weights import WeightsMismatchError
from engine.complexity import macs_by_module

X_SMALL = (2, 3, 64, 64)


@pytest.fixture(scope="module")
def gcn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet50_gcn").eval()


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet50").eval()


@pytest.fixture(scope="module")
def macs224() -> dict[str, dict[str, int]]:
    """MACs of the networks as pretraining trains them (anti-aliased)."""
    from backbone.models import create_backbone

    return {key: macs_by_module(create_backbone(name, anti_aliasing="blurpool"), (1, 3, 224, 224))
            for key, name in (("gcn", "resnet50_gcn"), ("r50", "resnet50"))}


def _convs(block: nn.Module) -> list[nn.Conv2d]:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]


# ---- structure ------------------------------------------------------------------------------

def test_registered_with_timm():
    assert "resnet50_gcn" in timm.list_models("resnet50_gcn")
    assert timm.is_model("resnet50_gcn")


def test_stages_match_table_11(gcn):
    assert [len(getattr(gcn, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    for stage, k, width, out in (("layer3", 5, 85, 1024), ("layer4", 7, 128, 2048)):
        for i, block in enumerate(getattr(gcn, stage)):
            assert isinstance(block, GCNBlock)
            a0, a1 = block.branch_a[0].conv, block.branch_a[1].conv
            b0, b1 = block.branch_b[0].conv, block.branch_b[1].conv
            assert (a0.kernel_size, a1.kernel_size) == ((1, k), (k, 1))
            assert (b0.kernel_size, b1.kernel_size) == ((k, 1), (1, k))
            assert a0.out_channels == b0.out_channels == a1.out_channels == b1.out_channels == width
            assert block.conv.in_channels == 2 * width and block.conv.out_channels == out
            stride = 2 if i == 0 else 1
            # stride on the first conv of each branch, so the large kernels run at low resolution
            assert a0.stride == b0.stride == (stride, stride) and a1.stride == b1.stride == (1, 1)
            assert (block.downsample is not None) == (i == 0)


def test_res1_to_res3_identical_to_resnet50(gcn, r50):
    sd_g, sd_r = gcn.state_dict(), r50.state_dict()
    early = [k for k in sd_r if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert early and all(k in sd_g and sd_g[k].shape == sd_r[k].shape for k in early)
    assert [k for k in sd_g if k.startswith(("layer1.", "layer2."))] == [
        k for k in sd_r if k.startswith(("layer1.", "layer2."))]
    assert repr(gcn.layer2) == repr(r50.layer2)


def test_branch_width_arithmetic():
    # The equations: 12288c + 10c^2 = 1,114,112 and 32768c + 14c^2 = 4,456,448.
    assert bottleneck_macs_per_pixel(256) == 1_114_112 and bottleneck_macs_per_pixel(512) == 4_456_448
    assert gcn_macs_per_pixel(256, 5, 1) - 10 == 12288 and gcn_macs_per_pixel(512, 7, 1) - 14 == 32768
    assert matched_branch_width(256, 5) == 85
    assert abs(matched_branch_width(512, 7) - 128) <= 1  # solves to 128.9; Table 11 says 128
    for p, k, c in ((256, 5, 85), (512, 7, 128)):
        assert abs(gcn_macs_per_pixel(p, k, c) / bottleneck_macs_per_pixel(p) - 1) < 0.01


def test_sum_merge_is_an_option():
    model = timm.create_model("resnet50_gcn", gcn_merge="sum")
    block = model.layer3[1]
    assert not block.concat and block.conv.in_channels == block.width == matched_branch_width(256, 5, "sum")
    assert model(torch.randn(X_SMALL)).shape == (2, 1000)
    with pytest.raises(ValueError, match="merge"):
        timm.create_model("resnet50_gcn", gcn_merge="mean")


def _reference_block(block: GCNBlock, x: torch.Tensor) -> torch.Tensor:
    """Figure 5 B written out with functional ops on the block's own weights (eval mode, no BlurPool)."""

    def cna(layer, t):  # conv -> BN (running statistics) -> ReLU
        conv, bn = layer.conv, layer.bn
        t = F.conv2d(t, conv.weight, stride=conv.stride, padding=conv.padding)
        return torch.relu(F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))

    a = cna(block.branch_a[1], cna(block.branch_a[0], x))  # 1xk then kx1
    b = cna(block.branch_b[1], cna(block.branch_b[0], x))  # kx1 then 1xk
    merged = torch.cat([a, b], dim=1) if block.concat else a + b
    y = F.batch_norm(F.conv2d(merged, block.conv.weight), block.bn.running_mean, block.bn.running_var,
                     block.bn.weight, block.bn.bias, eps=block.bn.eps)
    shortcut = x if block.downsample is None else block.downsample(x)
    return torch.relu(y + shortcut)


def _randomise_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters (so no BN is the identity or zero)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_gcn_block_output_values(merge):
    """The block computes relu(BN(conv1x1(merge(A(x), B(x)))) + shortcut), branch A = 1xk->kx1, B = kx1->1xk."""
    torch.manual_seed(0)
    block = GCNBlock(32, 8, kernel_size=5, width=6, merge=merge).eval()  # identity shortcut (32 = 4 x 8)
    _randomise_bn(block, 1)
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        out = block(x.clone())  # the block adds the shortcut in place: keep x
        expected = _reference_block(block, x)
    torch.testing.assert_close(out, expected)
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()  # the closing ReLU clips


def test_strided_gcn_block_in_resnet50_gcn_output_values(gcn):
    """A stage's first block (stride 2 on each branch's first conv, projection shortcut), inside the model."""
    block = copy.deepcopy(gcn.layer4[0])  # the fixture is shared: change a copy
    assert block.downsample is not None and isinstance(block.aa, nn.Identity)
    _randomise_bn(block, 2)  # zero_init_last: the last BN scale starts at 0, which would hide the branches
    x = torch.randn(1, 1024, 8, 6)
    with torch.no_grad():
        out = block(x.clone())
        expected = _reference_block(block, x)
    assert out.shape == (1, 2048, 4, 3)
    torch.testing.assert_close(out, expected)


# ---- cost ---------------------------------------------------------------------------------------

def test_total_macs_within_10_percent_of_resnet50(macs224):
    ratio = macs224["gcn"][""] / macs224["r50"][""]
    assert 0.9 <= ratio <= 1.1, ratio


@pytest.mark.parametrize("stage,first_matters", [("layer3", 6), ("layer4", 3)])
def test_each_non_first_block_within_2_percent(macs224, stage, first_matters):
    for i in range(1, first_matters):
        g, r = macs224["gcn"][f"{stage}.{i}"], macs224["r50"][f"{stage}.{i}"]
        assert abs(g / r - 1) <= 0.02, (stage, i, g, r)
    # and the formula of the docstring is what the flop counter sees (14x14 / 7x7 at 224 input)
    hw = {"layer3": 14 * 14, "layer4": 7 * 7}[stage]
    p, k, c = (256, 5, 85) if stage == "layer3" else (512, 7, 128)
    assert macs224["gcn"][f"{stage}.1"] == gcn_macs_per_pixel(p, k, c) * hw


def test_report_cli_json():
    out = subprocess.run([sys.executable, "-m", "backbone.report", "--json", "--resolution", "64"],
                         capture_output=True, text=True, check=True).stdout
    reports = {r["model"]: r for r in json.loads(out)}
    assert set(reports) == {"resnet50", "resnet50_gcn"}
    for r in reports.values():
        assert sum(s["macs"] for s in r["stages"].values()) == r["total"]["macs"]
        assert sum(s["params"] for s in r["stages"].values()) == r["total"]["params"]
    bad = subprocess.run([sys.executable, "-m", "backbone.report", "resnet5O_gcn"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


# ---- timm conformance ---------------------------------------------------------------------------

def test_num_classes_and_heads(gcn):
    x = torch.randn(X_SMALL)
    model = timm.create_model("resnet50_gcn", num_classes=7)
    assert model(x).shape == (2, 7)
    feats = gcn.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2)
    assert gcn.forward_head(feats, pre_logits=True).shape == (2, 2048)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 2048)


def test_features_only():
    model = timm.create_model("resnet50_gcn", features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    outs = model(torch.randn(1, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 24, 32), (1, 512, 12, 16), (1, 1024, 6, 8),
                                              (1, 2048, 3, 4)]


def test_forward_intermediates(gcn):
    x = torch.randn(X_SMALL)
    final, inter = gcn.forward_intermediates(x, indices=4)
    assert [t.shape[1] for t in inter] == [256, 512, 1024, 2048]
    assert torch.allclose(final, gcn.forward_features(x))


def test_channels_last_matches_nchw(gcn):
    x = torch.randn(X_SMALL)
    with torch.no_grad():
        ref = gcn(x)
        model_cl = timm.create_model("resnet50_gcn").eval()
        model_cl.load_state_dict(gcn.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_every_parameter_gets_a_gradient():
    model = timm.create_model("resnet50_gcn", zero_init_last=False).train()
    model(torch.randn(X_SMALL)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_meta_device_and_dtype():
    model = timm.create_model("resnet50_gcn", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model = timm.create_model("resnet50_gcn", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_jit_script_and_fx(gcn):
    x = torch.randn(X_SMALL)
    with torch.no_grad():
        ref = gcn(x)
        scripted = torch.jit.script(gcn)
        torch.testing.assert_close(scripted(x), ref)
        traced = torch.fx.symbolic_trace(gcn)
        torch.testing.assert_close(traced(x), ref)
    fx_feats = timm.create_model("resnet50_gcn", features_only=True, feature_cls="fx")
    assert [o.shape[1] for o in fx_feats(x)] == [64, 256, 512, 1024, 2048]


def test_torch_compile(gcn):
    x = torch.randn(X_SMALL)
    with torch.no_grad():
        # Whole model: dynamo captures it as one graph (no graph breaks). Inductor's code
        # generation of the whole network takes minutes on 2 cores, so it runs on one block.
        whole = torch.compile(gcn, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(whole(x), gcn(x))
        block = gcn.layer4[1]
        y = torch.randn(2, 2048, 4, 4)
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(y), block(y), rtol=1e-4, atol=1e-4)


def test_blurpool_and_dilation_options():
    from timm.layers import BlurPool2d
    model = timm.create_model("resnet50_gcn", aa_layer=BlurPool2d)
    assert model(torch.randn(X_SMALL)).shape == (2, 1000)
    model = timm.create_model("resnet50_gcn", output_stride=16, features_only=True)
    assert model.feature_info.reduction()[-1] == 16
    assert model(torch.randn(X_SMALL))[-1].shape[-1] == 4


# ---- weights -------------------------------------------------------------------------------------

def _final_pth(model: nn.Module, path, name="resnet50_gcn"):
    torch.save({"state_dict": model.state_dict(), "model_name": name, "num_classes": 1000,
                "pretrained_cfg": dict(model.pretrained_cfg), "format": WEIGHTS_FORMAT}, path)
    return path


@pytest.mark.parametrize("fmt", ["final", "train", "plain"])
def test_checkpoint_round_trip_through_create_model(gcn, tmp_path, fmt):
    path = tmp_path / f"{fmt}.pth"
    if fmt == "final":
        _final_pth(gcn, path)
    elif fmt == "train":
        torch.save({"model": {f"module.{k}": v for k, v in gcn.state_dict().items()}, "epoch": 3,
                    "model_name": "resnet50_gcn", "format": "lkm-train-v1"}, path)
    else:
        torch.save(gcn.state_dict(), path)
    x = torch.randn(X_SMALL)
    with torch.no_grad():
        ref = gcn(x)
        by_file = timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(by_file.eval()(x), ref)
        by_ckpt = timm.create_model("resnet50_gcn", checkpoint_path=str(path))
        if fmt != "train":  # timm's checkpoint_path does not strip DDP's 'module.'; pretrained= does
            torch.testing.assert_close(by_ckpt.eval()(x), ref)
        # another class count: the backbone loads, the classifier is new
        ten = timm.create_model("resnet50_gcn", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(ten.layer4[2].conv.weight, gcn.layer4[2].conv.weight)
        feats = timm.create_model("resnet50_gcn", pretrained=True, features_only=True,
                                  pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(feats.eval()(x)[-1], gcn.forward_features(x))


def test_ema_weights_preferred(gcn, tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in gcn.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": gcn.state_dict(), "model_ema": ema, "model_name": "resnet50_gcn"}, path)
    model = timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.conv1.weight, ema["conv1.weight"])


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "final.pth"
    with pytest.raises(FileNotFoundError, match="nope/final.pth"):
        timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(FileNotFoundError, match="nope/final.pth"):
        backbone.load_weights(timm.create_model("resnet50"), missing)


def test_other_architecture_is_named(r50, tmp_path):
    path = _final_pth(r50, tmp_path / "r50_final.pth", name="resnet50")
    with pytest.raises(WeightsMismatchError) as err:
        timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(err.value)
    assert "r50_final.pth" in msg and "'resnet50_gcn'" in msg and "resnet50)" in msg
    assert "layer3.0.branch_a.0.conv.weight" in msg  # missing in the checkpoint
    assert "layer3.0.conv2.weight" in msg  # not in the model
    assert "shape mismatches" in msg and "layer4.0.conv" in msg or "missing" in msg
    # timm's checkpoint_path= route: the keys are named (timm does not pass the file name on)
    with pytest.raises(WeightsMismatchError, match="layer3.0.branch_a.0.conv.weight"):
        timm.create_model("resnet50_gcn", checkpoint_path=str(path))
    # and the other way round, through the project's loader
    gcn_path = _final_pth(timm.create_model("resnet50_gcn"), tmp_path / "gcn_final.pth")
    with pytest.raises(WeightsMismatchError, match=r"gcn_final.pth does not fit model 'resnet50'"):
        backbone.load_weights(timm.create_model("resnet50"), gcn_path)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read checkpoint .*truncated.pth"):
        backbone.read_state_dict(bad)


# ---- the trained network, rebuilt by every consumer (issue: BlurPool was dropped at transfer) ------------

def _trained(name: str, anti_aliasing: str | None) -> nn.Module:
    """A network built as pretraining builds it, with BN statistics that make eval mode differ from train."""
    from backbone.train import ModelConfig, create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, blurpool=anti_aliasing is not None), num_classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _write_final(model: nn.Module, name: str, anti_aliasing: str | None, path) -> None:
    from backbone.artifacts import FinalWeights

    FinalWeights(state_dict=model.state_dict(), model_name=name, num_classes=5,
                 pretrained_cfg=dict(model.pretrained_cfg), model_kwargs={"anti_aliasing": anti_aliasing}).save(path)


def _stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """res-2..res-5 of a timm ResNet, computed through the classification model itself."""
    y = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        y = layer(y)
        out.append(y)
    return out


@pytest.mark.parametrize("name", ["resnet50", "resnet50_gcn"])
@pytest.mark.parametrize("anti_aliasing", [None, "blurpool"])
def test_every_consumer_rebuilds_the_trained_network(name, anti_aliasing, tmp_path):
    from backbone.antialias import anti_aliasing_of
    from backbone.artifacts import load_backbone
    from segmentation.network import build_segmentation_model

    trained = _trained(name, anti_aliasing)
    assert anti_aliasing_of(trained) == anti_aliasing
    path = tmp_path / "final.pth"
    _write_final(trained, name, anti_aliasing, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = trained(x)
        rebuilt, _ = load_backbone(path)  # the project's route, any architecture
        torch.testing.assert_close(rebuilt.eval()(x), logits, rtol=0, atol=0)
        # the segmentation encoder: res-2..res-5 of the trained network, exactly
        encoder = build_segmentation_model(name, "baseline", num_classes=3, kernel_size=3, pretrained=path).encoder
        for got, want in zip(encoder.eval()(x), _stage_outputs(trained, x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if name == "resnet50_gcn":  # ours: both timm routes follow the weights
            by_file = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
            torch.testing.assert_close(by_file.eval()(x), logits, rtol=0, atol=0)
            by_ckpt = timm.create_model(name, num_classes=5, checkpoint_path=str(path))
            torch.testing.assert_close(by_ckpt.eval()(x), logits, rtol=0, atol=0)
        elif anti_aliasing is None:  # timm's own resnet50 loads plain weights as it always did
            by_file = timm.create_model(name, pretrained=True, num_classes=5,
                                        pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
            torch.testing.assert_close(by_file.eval()(x), logits, rtol=0, atol=0)
        else:  # ... and cannot build the blur: it refuses the weights rather than ignore it
            with pytest.raises(RuntimeError, match="blur_filter"):
                timm.create_model(name, pretrained=True, num_classes=5,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=5))


def test_a_conflicting_construction_is_an_error(tmp_path):
    from backbone.artifacts import load_backbone
    from segmentation.network import build_segmentation_model

    path = tmp_path / "final.pth"
    _write_final(_trained("resnet50_gcn", "blurpool"), "resnet50_gcn", "blurpool", path)
    with pytest.raises(WeightsMismatchError, match="trained with anti-aliasing.*anti_aliasing=None"):
        timm.create_model("resnet50_gcn", anti_aliasing="none", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(WeightsMismatchError, match="anti_aliasing=None"):
        load_backbone(path, anti_aliasing=None)
    with pytest.raises(WeightsMismatchError, match="anti_aliasing=None"):
        build_segmentation_model("resnet50_gcn", "baseline", num_classes=3, pretrained=path, anti_aliasing=None)
    plain = tmp_path / "plain.pth"
    _write_final(_trained("resnet50_gcn", None), "resnet50_gcn", None, plain)
    with pytest.raises(WeightsMismatchError, match="trained without anti-aliasing"):
        timm.create_model("resnet50_gcn", anti_aliasing="blurpool", checkpoint_path=str(plain))


def test_one_anti_aliasing_for_both_backbones_is_cost_neutral():
    from backbone.antialias import BlurConv2d

    for name in ("resnet50", "resnet50_gcn"):
        model = _trained(name, "blurpool")
        blurred = {n for n, m in model.named_modules() if isinstance(m, BlurConv2d)}
        strided = {n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= 16}
        # every strided conv with >= 16 inputs is blurred, projections included, and keeps its stride
        assert blurred == strided and any(n.endswith("downsample.0") for n in blurred)
        assert all(max(model.get_submodule(n).stride) == 2 for n in blurred)
    plain = {n: macs_by_module(_trained(n, None), (1, 3, 224, 224))[""] for n in ("resnet50", "resnet50_gcn")}
    aa = {n: macs_by_module(_trained(n, "blurpool"), (1, 3, 224, 224))[""] for n in ("resnet50", "resnet50_gcn")}
    for n in plain:  # the blur is a depthwise 3x3 per strided conv: under 1 % of the network
        assert plain[n] < aa[n] < 1.01 * plain[n]
    assert abs(aa["resnet50_gcn"] / aa["resnet50"] - 1) < 0.10  # as trained, still within 10 %
