"""timm backbones beyond ResNet: a ResNet, a ConvNeXt, an EfficientNet and a RegNet (timm's tiny test models)
pretrained, fine-tuned from that final.pth and collected by the comparison; models that cannot work refused up
front, in both stages, with the reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hangs import ROOT, run_watched

from backbone.artifacts import FinalWeights
from backbone.models import TESTED_FAMILIES, check_input_sizes, create_backbone
from segmentation.network import build_segmentation_model, stage_indices

FAMILIES = {"resnet": "test_resnet", "convnext": "test_convnext", "efficientnet": "test_efficientnet",
            "regnet": "regnetx_002"}


def test_the_families_tested_are_the_ones_the_errors_name() -> None:
    assert tuple(FAMILIES) == TESTED_FAMILIES


@pytest.mark.parametrize("name", FAMILIES.values())
def test_trained_weights_reach_timms_feature_wrapper(name: str, tmp_path: Path) -> None:
    """The fine-tune's encoder, built from a final.pth, computes what the trained classifier computes at res-2..
    res-5 (timm's forward_intermediates of it): every tensor placed, the anti-aliasing too."""
    torch.manual_seed(0)
    model = create_backbone(name, anti_aliasing="blurpool", num_classes=4).eval()
    with torch.no_grad():  # weights unlike any fresh initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = FinalWeights(state_dict=model.state_dict(), model_name=name, num_classes=4,
                        pretrained_cfg=dict(model.pretrained_cfg),
                        model_kwargs={"anti_aliasing": "blurpool"}).save(tmp_path / "final.pth")
    net = build_segmentation_model(name, head="gcn_br", num_classes=3, kernel_size=3, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = net.encoder(x)
        expected = model.forward_intermediates(x, indices=list(stage_indices(name)), intermediates_only=True)
    assert net.anti_aliasing == "blurpool"
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_models_that_cannot_work_are_refused_before_anything_is_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from backbone import train
    from segmentation import finetune

    run_dir = tmp_path / "run"
    code = finetune.main(["--config", str(ROOT / "configs/segmentation/tiny_cpu.yaml"), "--backbone",
                          "vit_tiny_patch16_224", f"data.root={tmp_path}", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "error: model.backbone / --backbone: backbone 'vit_tiny_patch16_224' gives feature maps at strides " \
           "(16, 16, 16" in err and "needs strides (4, 8, 16, 32)" in err, err
    code = train.main(["--config", str(ROOT / "configs/pretrain/tiny_cpu.yaml"), "model.name=cait_xxs24_224",
                       f"data.train={tmp_path}/t.beton", f"data.val={tmp_path}/v.beton", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "error: model.name=cait_xxs24_224 cannot take 32 x 32 px images" in err and \
        "doesn't match model (224)" in err, err
    assert not run_dir.exists()
    from experiments.compare import main as compare  # it fine-tunes every backbone: refused before any run

    assert compare([f"output={run_dir}", "backbones=[resnet10t, vit_tiny_patch16_224]", "heads=[gcn_br]",
                    "seeds=[0]"]) == 2
    err = capsys.readouterr().err
    assert "error: backbones: backbone 'vit_tiny_patch16_224' gives feature maps at strides (16, 16, 16)" in err, err
    assert not run_dir.exists()


def test_a_vit_built_for_224_px_pretrains_at_the_ramps_sizes() -> None:
    """timm's dynamic_img_size: the ViT the issue tried (model.name=vit_tiny_patch16_224) takes 32-64 px crops."""
    check_input_sizes("vit_tiny_patch16_224", {32, 48, 64, 224}, "model.name", anti_aliasing="blurpool")
    model = create_backbone("vit_tiny_patch16_224", anti_aliasing="blurpool", num_classes=4)
    for size in (32, 64):
        loss = model(torch.randn(2, 3, size, size)).logsumexp(1).mean()
        loss.backward()
        assert torch.isfinite(loss)


# --- end to end: the comparison over the four families --------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m experiments.compare`` with the four backbones, one head, one seed, a few steps each."""
    from backbone.write_beton import WriterSettings, write_beton
    from experiments.shapes import ShapesSpec, write_shapes

    data = tmp_path_factory.mktemp("shapes")
    write_shapes(data, ShapesSpec(seed=3, train_per_class=8, val_per_class=3, voc_train=6, voc_val=3, sbd=0,
                                  min_size=48, max_size=56), progress=False)
    for split in ("train", "val"):
        write_beton(data / "imagenet" / split, data / f"{split}.beton", WriterSettings(max_resolution=64),
                    num_workers=1)
    output = tmp_path_factory.mktemp("families")
    overrides = [
        f"output={output}", f"backbones=[{', '.join(FAMILIES.values())}]", "heads=[gcn_br]", "seeds=[0]",
        "stats.replicates=100", "pretrain.config=configs/pretrain/tiny_cpu.yaml",
        f"pretrain.overrides=[data.train={data / 'train.beton'}, data.val={data / 'val.beton'}, train.epochs=1, "
        "data.global_batch=8, train.deterministic=false]",
        "finetune.config=configs/segmentation/tiny_cpu.yaml",
        f"finetune.overrides=[data.root={data / 'VOCdevkit'}, train.iterations=2, eval.every=0, "
        "train.deterministic=false]",
        "evaluate.boundary_width=2", "figures.figure6_images=1", "figures.vrf_images=0",
    ]
    done = run_watched([sys.executable, "-m", "experiments.compare", *overrides], cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return output


@pytest.mark.slow
def test_every_family_pretrains_fine_tunes_from_its_final_pth_and_is_collected(comparison: Path) -> None:
    record = json.loads((comparison / "table6.json").read_text())
    assert record["missing"] == [] and record["backbones"] == list(FAMILIES.values())
    for name in FAMILIES.values():
        pretrained = comparison / "pretrain" / name / "seed0" / "final.pth"
        run = comparison / "finetune" / f"{name}_gcn_br" / "seed0"
        assert f"backbone {name}: loaded weights from {pretrained}" in (run / "train.log").read_text()
        assert (run / "final.pth").exists() and record["pretrain"][name]["n"] == 1
        seg = record["segmentation"][f"{name}+gcn_br"]
        assert seg["n"] == 1 and 0 <= seg["miou"] <= 100 and seg["runs"]["0"]["images"] == 3
