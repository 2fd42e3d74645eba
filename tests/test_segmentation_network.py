"""The GCN + BR segmentation network (Figure 2), its ablation heads, backbone weights and export paths."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from backbone.weights import WeightsMismatchError
from engine.complexity import count_params
from segmentation import report
from segmentation.heads import (
    GCN,
    HEADS,
    BoundaryRefinement,
    ConvScore,
    ConvStack,
    bilinear_deconv,
)
from segmentation.network import build_segmentation_model, stage_indices

BACKBONES = ("resnet50", "resnet50_gcn")


def _count(make) -> int:
    with torch.device("meta"):
        return count_params(make())


# --- parameter counts: the paper's Tables 2 and 4 -------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_gcn_and_conv_params_match_table2(k):
    gcn = _count(lambda: GCN(2048, 21, k))
    conv = _count(lambda: ConvScore(2048, 21, k))
    assert gcn == 2 * k * (2048 * 21 + 21 * 21)
    assert conv == k * k * 2048 * 21
    assert report.matches_paper(gcn, report.PAPER_TABLE2["gcn"][k]), gcn
    assert report.matches_paper(conv, report.PAPER_TABLE2["conv"][k]), conv


@pytest.mark.parametrize("m, paper", [(2048, 75885), (1024, 28505), (210, 4307)])
def test_stack_params_match_table4(m, paper):
    stack = ConvStack(2048, 21, 7, mid_chs=m).to("meta")
    assert [tuple(c.weight.shape) for c in stack] == [(m, 2048, 3, 3), (m, m, 3, 3), (21, m, 3, 3)]
    assert report.matches_paper(count_params(stack), paper)
    assert round(count_params(stack) / 1000) == paper


def test_matches_paper_rejects_a_wrong_structure():
    # Biases (2,069 more parameters) or one more layer put the count off the paper's figure.
    with_bias = _count(lambda: ConvStack(2048, 21, 7, mid_chs=1024, bias=True))
    assert with_bias == 28_505_088 + 2069
    assert not report.matches_paper(with_bias, 28505)
    deeper = _count(lambda: ConvStack(2048, 21, 9, mid_chs=1024))
    assert not report.matches_paper(deeper, 28505)
    assert not report.matches_paper(261_001, 260)


def test_stack_depth_reaches_kernel_receptive_field():
    for k in (3, 5, 7, 15):
        stack = ConvStack(8, 2, k, mid_chs=4)
        assert len(stack) == (k - 1) // 2
        # Receptive field of n stacked 3x3 convs is 2n + 1 = k: an impulse spreads to a kxk square.
        with torch.no_grad():
            for conv in stack:
                conv.weight.fill_(1.0)
            x = torch.zeros(1, 8, 31, 31)
            x[..., 15, 15] = 1
            support = stack(x)[0, 0] != 0
        rows, cols = support.nonzero().unbind(1)
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (k, k)


# --- module semantics -----------------------------------------------------------------------------------


def test_gcn_sums_two_separable_branches():
    torch.manual_seed(0)
    gcn = GCN(6, 4, 5)
    x = torch.randn(2, 6, 11, 9)
    (a1, a2), (b1, b2) = gcn.left, gcn.right
    assert a1.kernel_size == (5, 1) and a2.kernel_size == (1, 5)
    assert b1.kernel_size == (1, 5) and b2.kernel_size == (5, 1)
    left = F.conv2d(F.conv2d(x, a1.weight, padding=(2, 0)), a2.weight, padding=(0, 2))
    right = F.conv2d(F.conv2d(x, b1.weight, padding=(0, 2)), b2.weight, padding=(2, 0))
    torch.testing.assert_close(gcn(x), left + right)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in gcn.modules())


def test_boundary_refinement_is_a_residual_branch():
    torch.manual_seed(0)
    br = BoundaryRefinement(5)
    x = torch.randn(1, 5, 8, 8)
    expected = x + br.conv2(torch.relu(br.conv1(x)))
    torch.testing.assert_close(br(x.clone()), expected)
    with torch.no_grad():
        br.conv2.weight.zero_()
        br.conv2.bias.zero_()
    torch.testing.assert_close(br(x.clone()), x)


def test_deconv_starts_as_bilinear_upsampling():
    x = torch.randn(2, 3, 6, 7)
    up = bilinear_deconv(3)
    y = up(x)
    assert y.shape == (2, 3, 12, 14)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    # Identical away from the border, where the deconv sees zero padding and bilinear clamps.
    torch.testing.assert_close(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    assert up.weight.requires_grad


# --- the whole network ----------------------------------------------------------------------------------


def test_stage_indices_pick_res2_to_res5():
    for name in BACKBONES:
        assert stage_indices(name) == (1, 2, 3, 4)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_gives_logits_of_the_input_size(head):
    model = build_segmentation_model("resnet50", head, num_classes=3, kernel_size=5, stack_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 70)).shape == (1, 3, 45, 70)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_any_input_size_on_each_backbone(backbone):
    model = build_segmentation_model(backbone, "gcn_br", num_classes=5, kernel_size=15).eval()
    assert model.encoder.feature_info.channels() == [256, 512, 1024, 2048]
    with torch.no_grad():
        for h, w in [(33, 97), (64, 64), (1, 1)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5, h, w)


def test_nine_refinement_blocks_when_br_is_on():
    def n_br(head, br=None):
        with torch.device("meta"):
            model = build_segmentation_model("resnet50", head, num_classes=2, br=br)
        return sum(isinstance(m, BoundaryRefinement) for m in model.modules())

    assert n_br("gcn_br") == 9
    assert n_br("gcn") == n_br("baseline") == n_br("conv") == 0
    assert n_br("baseline", br=True) == n_br("gcn", br=True) == 9


def test_top_down_path_runs_at_each_stage_resolution():
    model = build_segmentation_model("resnet50", "gcn_br", num_classes=4, kernel_size=3).eval()
    shapes = {}
    def record(key):
        return lambda _module, _inputs, out: shapes.__setitem__(key, out.shape[-2:])

    for name in ("heads", "up", "final_up"):
        for i, m in enumerate(getattr(model, name)):
            m.register_forward_hook(record(f"{name}{i}"))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 64))  # multiple of 32: no padding
    assert [tuple(shapes[f"heads{i}"]) for i in range(4)] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    assert [tuple(shapes[f"up{i}"]) for i in range(3)] == [(24, 16), (12, 8), (6, 4)]
    assert [tuple(shapes[f"final_up{i}"]) for i in range(2)] == [(48, 32), (96, 64)]


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_segmentation_model("resnet50", "gcn_br", num_classes=3, kernel_size=7).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    F.cross_entropy(model(x), target).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # timm zero-initialises each residual block's last BN, so only the decoder is sure to move at step 1.
    decoder = {n: p for n, p in model.named_parameters() if not n.startswith("encoder.")}
    assert [n for n, p in decoder.items() if not p.grad.abs().sum() > 0] == []


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(backbone="resnet5O"), ValueError, "unknown backbone 'resnet5O'"),
    (dict(backbone="resnet50", head="gcnbr"), ValueError, "gcn_br"),
    (dict(backbone="resnet50", kernel_size=4), ValueError, "odd kernel size"),
    (dict(backbone="resnet50", head="stack", kernel_size=1), ValueError, "odd kernel size >= 3"),
    (dict(backbone="resnet50", head="gcn_br", br=False), ValueError, "head='gcn'"),
    (dict(backbone="vit_tiny_patch16_224"), ValueError, "strides (4, 8, 16, 32)"),
    (dict(backbone="resnet50", pretrained="timm:resnet18.a1_in1k"), ValueError, "--backbone resnet18"),
    (dict(backbone="resnet50", pretrained="timm:no_such_tag"), ValueError, "resnet50.a1_in1k"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, error, words):
    with pytest.raises(error) as info:
        build_segmentation_model(**kwargs)
    assert words in str(info.value)


# --- backbone weights -----------------------------------------------------------------------------------


def _final_pth(path, name, **kwargs):
    """A checkpoint in the format pretraining writes (backbone/weights.py: 'lkm-weights-v1')."""
    torch.manual_seed(1)
    model = timm.create_model(name, **kwargs)
    checkpoint = {"state_dict": model.state_dict(), "model_name": name, "num_classes": model.num_classes,
                  "pretrained_cfg": dict(model.pretrained_cfg), "format": "lkm-weights-v1"}
    torch.save(checkpoint, path)
    return model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_final_pth_weights_reach_the_encoder(tmp_path, backbone):
    # A classifier of another size is ignored: only the encoder is taken.
    src = _final_pth(tmp_path / "final.pth", backbone, num_classes=10)
    model = build_segmentation_model(backbone, "gcn_br", num_classes=3, pretrained=tmp_path / "final.pth")
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    got = model.encoder.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert model.pretrained_meta["model_name"] == backbone


def test_training_checkpoint_loads_its_ema_weights(tmp_path):
    torch.manual_seed(2)
    raw, ema = timm.create_model("resnet50"), timm.create_model("resnet50")
    wrapped = {f"module.{k}": v for k, v in raw.state_dict().items()}  # as saved from DDP
    torch.save({"model": wrapped, "model_ema": ema.state_dict(), "optimizer": {}, "epoch": 3,
                "model_name": "resnet50", "format": "lkm-train-v1"}, tmp_path / "last.pth")
    model = build_segmentation_model("resnet50", "baseline", pretrained=str(tmp_path / "last.pth"))
    assert torch.equal(model.encoder.conv1.weight, ema.conv1.weight)
    assert not torch.equal(model.encoder.conv1.weight, raw.conv1.weight)


def test_checkpoint_of_another_architecture_names_file_and_keys(tmp_path):
    path = tmp_path / "resnet18_final.pth"
    _final_pth(path, "resnet18")
    with pytest.raises(WeightsMismatchError) as info:
        build_segmentation_model("resnet50", "gcn_br", pretrained=path)
    message = str(info.value)
    assert str(path) in message and "resnet50" in message and "resnet18" in message
    assert "layer1.0.conv3.weight" in message


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_segmentation_model("resnet50", pretrained=tmp_path / "nowhere.pth")


def test_timm_weights_offline_fail_with_a_fix(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub.constants")
    # Offline with an empty cache, whatever the machine running the test has downloaded before.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        build_segmentation_model("resnet50", pretrained="timm:a1_in1k")
    assert "resnet50.a1_in1k" in str(info.value) and "local checkpoint" in str(info.value)


# --- export and compilation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_segmentation_model("resnet50", "gcn_br", num_classes=3, kernel_size=7).eval()


@pytest.fixture(scope="module")
def odd_input():
    torch.manual_seed(1)
    return torch.randn(1, 3, 45, 70)


def test_channels_last_gives_the_same_logits(small_model, odd_input):
    model = copy.deepcopy(small_model)
    with torch.no_grad():
        ref = model(odd_input)
        model = model.to(memory_format=torch.channels_last)
        out = model(odd_input.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# The trace holds the padding for this input size (TracerWarning): a traced network serves one size.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_jit_trace_matches_eager(small_model, odd_input):
    with torch.no_grad():
        ref = small_model(odd_input)
        traced = torch.jit.trace(small_model, odd_input, check_trace=False)
        torch.testing.assert_close(traced(odd_input), ref)


def test_compile_captures_one_graph(small_model, odd_input):
    torch._dynamo.reset()
    compiled = torch.compile(small_model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(odd_input), small_model(odd_input))


@pytest.mark.slow
def test_compile_with_inductor(small_model, odd_input):
    # Inductor generates and builds C++ kernels: ~100 s on 2 cores with a cold cache, ~7 s warm.
    torch._dynamo.reset()
    compiled = torch.compile(small_model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(odd_input), small_model(odd_input), rtol=1e-4, atol=1e-4)


def test_onnx_export_runs_in_onnxruntime(small_model, odd_input, tmp_path):
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    assert not missing, f"ONNX export needs {', '.join(missing)}: pip install {' '.join(missing)} (dev extra)"
    import onnxruntime

    path = tmp_path / "gcn_br.onnx"
    torch.onnx.export(small_model, (odd_input,), path, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: odd_input.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), small_model(odd_input), rtol=1e-4, atol=1e-4)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- the report -----------------------------------------------------------------------------------------


def test_report_json_tables_and_costs(capsys):
    argv = ["--json", "--backbones", "resnet50", "--heads", "baseline", "gcn_br", "--size", "224"]
    assert report.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(row["gcn_match"] and row["conv_match"] for row in result["table2"])
    assert [row["params"] for row in result["table4"]] == [75_884_544, 28_505_088, 4_307_310, 608_286]
    rows = {row["head"]: row for row in result["network"]}
    # ResNet-50's convolutions cost 4.09 GMACs at 224x224 (timm, torchvision); the decoder adds the rest.
    for row in rows.values():
        assert row["gmacs"] - row["decoder_gmacs"] == pytest.approx(4.09, abs=0.02)
    assert rows["gcn_br"]["decoder_params"] - rows["baseline"]["decoder_params"] > 0
    # 1x1 score maps on 256+512+1024+2048 channels, no bias; five 21->21 4x4 deconvs, no bias.
    assert rows["baseline"]["decoder_params"] == 3840 * 21 + 5 * 21 * 21 * 16


def test_report_prints_tables(capsys):
    report.main(["--backbones", "resnet50", "--heads", "gcn", "--size", "64"])
    out = capsys.readouterr().out
    assert "Table 2" in out and "Table 4" in out and "NO" not in out
