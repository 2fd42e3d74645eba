"""Valid receptive field (Figure 3): exactness, object-centre location, scales, GCN vs baseline, CLI."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hangs import run_watched
from PIL import Image
from torch import nn

from experiments.receptive_field import (
    compare_receptive_fields,
    default_point,
    load_image_file,
    load_images_from_split,
    main,
    object_centre,
    receptive_field_report,
    scale_input,
    valid_receptive_field,
    vrf_area,
)
from segmentation.artifacts import SEG_WEIGHTS_FORMAT
from segmentation.network import build_segmentation_model
from segmentation.writers import write_vocdevkit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from threads, and on a shared 2-core machine two OpenMP threads that
    # wait for each other are 50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _box_conv(k: int, out_channels: int = 1, value: float = 0.5) -> nn.Conv2d:
    conv = nn.Conv2d(3, out_channels, k, padding=k // 2, bias=False)
    nn.init.constant_(conv.weight, value)
    return conv


# --- exactness on a single k x k conv ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5, 7])
def test_single_conv_vrf_is_exactly_its_window(k):
    conv = _box_conv(k).train()
    x = torch.ones(1, 3, 24, 24)
    vrf = valid_receptive_field(conv, x, (12, 11), share=1.0)
    assert vrf.area == k * k
    assert vrf.fraction == pytest.approx(k * k / (24 * 24))
    assert vrf.side == pytest.approx(k)
    assert vrf.size == (24, 24) and vrf.point == (12, 11) and not vrf.zero_gradient
    h = k // 2
    window = np.zeros((24, 24), dtype=bool)
    window[12 - h:12 + h + 1, 11 - h:11 + h + 1] = True
    assert np.array_equal(vrf.heat > 0, window)
    assert np.allclose(vrf.heat[window], 3 * 0.5)  # |weight| summed over the three colour channels
    assert np.array_equal(vrf.mask(), window)
    assert conv.training  # the model's mode is restored

    # Equal heat on k*k pixels: the fewest pixels holding half the mass are ceil(k*k / 2).
    half = valid_receptive_field(conv, x, (12, 11), share=0.5)
    assert half.area == math.ceil(k * k / 2)
    assert half.mask().sum() == half.area and (half.mask() <= window).all()


def test_single_conv_window_is_cut_at_the_image_border():
    vrf = valid_receptive_field(_box_conv(5), torch.ones(1, 3, 16, 16), (0, 1), share=1.0)
    assert vrf.area == 3 * 4  # rows 0..2, cols 0..3
    assert np.array_equal(np.argwhere(vrf.heat > 0).min(0), [0, 0])
    assert np.array_equal(np.argwhere(vrf.heat > 0).max(0), [2, 3])


def test_target_picks_the_differentiated_logit():
    # Class 0 sees a 5x5 window, class 1 only the central 3x3 (its other weights are zero).
    conv = _box_conv(5, out_channels=2)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.weight[1, :, 1:4, 1:4] = 0.5
    x = torch.ones(1, 3, 16, 16)
    predicted = valid_receptive_field(conv, x, (8, 8), share=1.0)  # logit 0 = 37.5 > logit 1 = 13.5
    assert predicted.target_class == 0 and predicted.area == 25
    assert valid_receptive_field(conv, x, (8, 8), share=1.0, target=1).area == 9
    summed = valid_receptive_field(conv, x[0], (8, 8), share=1.0, target="sum")  # 3 x H x W works too
    assert summed.target_class is None and summed.area == 25
    with pytest.raises(ValueError, match="target"):
        valid_receptive_field(conv, x, (8, 8), target=2)


def test_vrf_area_by_hand():
    heat = np.array([[4.0, 0.0], [2.0, 0.0], [3.0, 1.0]])  # sorted: 4 3 2 1 0 0, total 10
    assert vrf_area(heat, 0.4) == 1  # 4 >= 4
    assert vrf_area(heat, 0.5) == 2  # 4 < 5 <= 7
    assert vrf_area(heat, 0.7) == 2  # exactly 7
    assert vrf_area(heat, 0.71) == 3
    assert vrf_area(heat, 1.0) == 4  # the zeros hold nothing
    assert vrf_area(np.zeros((4, 4)), 0.9) == 0
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share"):
            vrf_area(heat, bad)


def test_zero_gradient_gives_area_zero_and_a_flag():
    conv = _box_conv(3, value=0.0)
    vrf = valid_receptive_field(conv, torch.ones(1, 3, 8, 8), (4, 4))
    assert vrf.zero_gradient and vrf.area == 0 and vrf.fraction == 0 and vrf.side == 0
    assert not vrf.mask().any()


def test_point_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="outside the 8x10"):
        valid_receptive_field(_box_conv(3), torch.ones(1, 3, 8, 10), (8, 0))


# --- where to look ----------------------------------------------------------------------------------------


def test_default_point_is_the_centre_of_the_largest_object():
    label = torch.zeros(60, 64, dtype=torch.long)
    label[10:30, 5:29] = 3  # 20 x 24 = 480 px, centre (19.5, 16.5)
    label[40:46, 40:46] = 1  # a smaller class
    label[50:60] = 255  # void, 640 px: more pixels than the object, but not a class
    (r, c), source = default_point((60, 64), label)
    assert source == "object" and label[r, c] == 3
    assert r in (19, 20) and c in (16, 17)
    assert min(r - 10, 29 - r, c - 5, 28 - c) == 9  # as far from the boundary as a pixel of it can be


def test_object_centre_of_a_disc_and_of_an_object_at_the_border():
    yy, xx = np.mgrid[0:50, 0:60]
    disc = (((yy - 30) ** 2 + (xx - 22) ** 2) <= 12 ** 2).astype(np.uint8) * 2
    r, c = object_centre(disc)
    assert abs(r - 30) <= 1 and abs(c - 22) <= 1
    corner = torch.zeros(40, 40, dtype=torch.long)
    corner[:20, :20] = 5  # the image border is the object's boundary too
    r, c = object_centre(corner)
    assert r in (9, 10) and c in (9, 10)


def test_default_point_without_an_object_is_the_image_centre():
    assert default_point((31, 40), None) == ((15, 20), "centre")
    assert default_point((31, 40), torch.zeros(31, 40, dtype=torch.long)) == ((15, 20), "centre")
    assert default_point((31, 40), torch.full((31, 40), 255)) == ((15, 20), "centre")
    assert object_centre(np.zeros((5, 5), dtype=np.uint8)) is None


# --- scales -----------------------------------------------------------------------------------------------


def test_scale_moves_the_point_with_the_image():
    x = torch.randn(3, 20, 30)
    x2, p2 = scale_input(x, (5, 7), 2.0)
    assert x2.shape == (3, 40, 60) and p2 == (11, 15)  # inside the 2x2 block of pixel (5, 7)
    xh, ph = scale_input(x[None], (5, 7), 0.5)
    assert xh.shape == (1, 3, 10, 15) and ph == (2, 3)
    assert scale_input(x, (19, 29), 1.5)[1] == (29, 44)  # the last pixel stays the last one


def test_scales_resize_the_heat_map_and_shrink_a_fixed_window_share():
    # A fixed 5x5 window is a quarter of the image's share at scale 2: the paper's Figure 3 (B) in small.
    images = [(torch.ones(3, 20, 30), None)]
    comparison = compare_receptive_fields({"conv5": _box_conv(5)}, images, scales=(1, 2), share=1.0)
    one, two = comparison.results["conv5"][1.0][0], comparison.results["conv5"][2.0][0]
    assert one.point == comparison.points[0] == (10, 15) and two.point == (21, 31)
    assert one.heat.shape == (20, 30) and two.heat.shape == (40, 60)
    assert one.area == two.area == 25
    assert two.fraction == pytest.approx(one.fraction / 4)
    rows, cols = np.nonzero(two.heat)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (19, 23, 29, 33)  # centred on the moved point
    record = comparison.to_json()
    assert set(record["models"]["conv5"]) == {"1", "2"}
    assert record["models"]["conv5"]["2"]["images"][0]["size"] == [40, 60]


# --- the paper's claim: a GCN head enlarges the VRF ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_gcn_head_has_a_larger_vrf_than_the_baseline_with_random_weights(seed):
    """Same seeded random resnet10t; 1x1 score maps (baseline) vs GCN k=7 heads, at the centre of a 64 px input.

    Seen: baseline ~1100-1200 px, GCN ~2500 px (of 4096) at share 0.9; both theoretical receptive
    fields (share 1.0) cover the whole image, as the paper says of the FCN baseline.
    """
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(100 + seed))
    vrfs = {}
    for head in ("baseline", "gcn"):
        torch.manual_seed(seed)
        model = build_segmentation_model("resnet10t", head, num_classes=21, kernel_size=7)
        vrfs[head] = valid_receptive_field(model, x, (32, 32), share=0.9)
        if head == "baseline":
            assert valid_receptive_field(model, x, (32, 32), share=1.0).fraction > 0.9
    base, gcn = vrfs["baseline"], vrfs["gcn"]
    assert not base.zero_gradient and not gcn.zero_gradient
    assert gcn.area > 1.5 * base.area, (base.area, gcn.area)


# --- report and CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    """VOCdevkit: 3 noisy 48x64 images, each with a filled rectangle of class 1 (and a small disc of class 2)."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    yy, xx = np.mgrid[0:48, 0:64]
    for i in range(3):
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[8 + i:32 + i, 10 + 2 * i:40 + 2 * i] = 1
        mask[((yy - 40) ** 2 + (xx - 54) ** 2) <= 16] = 2
        image = rng.integers(0, 256, size=(48, 64, 3)).astype(np.uint8)
        image[mask == 1] = (220, 40, 40)
        image[mask == 2] = (40, 200, 60)
        images.append(image)
        masks.append(mask)
    return write_vocdevkit(tmp_path_factory.mktemp("vrf_data"), images, masks, [0], [1, 2])


def test_report_api_writes_figure_and_json(voc, tmp_path):
    images = load_images_from_split(voc, "val", 2)
    assert len(images) == 2 and images[0][0].shape == (3, 48, 64) and images[0][1].shape == (48, 64)
    models = {"conv3": _box_conv(3), "conv7": _box_conv(7)}
    record = receptive_field_report(models, images, tmp_path, scales=(1.0,), share=1.0)
    assert (tmp_path / "receptive_field.png").is_file()
    assert json.loads((tmp_path / "receptive_field.json").read_text()) == record
    assert record["models"]["conv3"]["1"]["mean_area"] == 9 and record["models"]["conv7"]["1"]["mean_area"] == 49
    for image, (_, label) in zip(record["images"], images, strict=True):
        r, c = image["point"]
        assert image["point_source"] == "object" and label[r, c] == 1


def test_figure_panels_show_each_images_own_vrf_and_location():
    from experiments.receptive_field import receptive_field_grid

    # two images of different sizes: the same k x k window is a different share of each
    images = [(torch.ones(3, 24, 24), None), (torch.ones(3, 16, 30), None)]
    models = {"conv3": _box_conv(3), "conv5": _box_conv(5)}
    comparison = compare_receptive_fields(models, images, scales=(1.0, 2.0), share=1.0, points=[(5, 6), None])
    fig = receptive_field_grid(comparison, images)
    n_cols = 1 + len(models) * 2
    axes = fig.axes
    assert len(axes) == 2 * n_cols
    assert axes[0].get_title() == "image 0\n24x24, point (5, 6) [given]"
    assert axes[n_cols].get_title() == "image 1\n30x16, point (8, 15) [centre]"
    for i in range(2):
        for j, (model, scale) in enumerate([(m, s) for m in models for s in (1.0, 2.0)], start=1):
            vrf = comparison.results[model][scale][i]
            assert axes[i * n_cols + j].get_title() == \
                f"{model} x{scale:g}\nVRF {100 * vrf.fraction:.1f}%, {vrf.side:.0f} px side"
    titles = [ax.get_title() for ax in axes]
    assert len(set(titles)) == len(titles)  # every panel is another image, model or scale


def test_cli_two_random_models_end_to_end(voc, tmp_path, capsys):
    out = tmp_path / "vrf"
    rc = main(["--model", "resnet10t:baseline", "--model", "resnet10t:gcn", "--kernel-size", "7",
               "--data-root", str(voc), "--images", "2", "--scales", "1,2", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with Image.open(out / "receptive_field.png") as im:
        im.verify()
    with Image.open(out / "receptive_field.png") as im:
        width, height = im.size
    # 2 rows (images) x 5 columns (input + 2 models x 2 scales)
    assert 5 * 150 <= width <= 5 * 400 and 2 * 150 <= height <= 2 * 400 + 100 and width > height
    record = json.loads((out / "receptive_field.json").read_text())
    assert set(record["models"]) == {"resnet10t+baseline [random]", "resnet10t+gcn [random]"}
    for per_scale in record["models"].values():
        assert set(per_scale) == {"1", "2"}
        for summary in per_scale.values():
            assert summary["mean_area"] > 0 and len(summary["images"]) == 2
            assert all(v["area"] > 0 for v in summary["images"])
    assert [i["name"] for i in record["images"]] == ["2008_000001", "2008_000002"]
    assert "resnet10t+gcn [random]" in printed and "VRF area %" in printed and str(out) in printed


def test_cli_checkpoint_uses_its_runs_validation_images(voc, tmp_path, capsys):
    model_args = {"backbone": "resnet10t", "head": "gcn_br", "num_classes": 21, "kernel_size": 3}
    args = dict(model_args)
    model = build_segmentation_model(args.pop("backbone"), **args)
    ckpt = tmp_path / "run" / "final.pth"
    ckpt.parent.mkdir()
    torch.save({"format": SEG_WEIGHTS_FORMAT, "dataset": "voc", "model_args": model_args,
                "config": {"data": {"root": str(voc), "val_split": "val"}}, "state_dict": model.state_dict()}, ckpt)
    image = tmp_path / "picture.png"
    Image.fromarray(np.full((40, 36, 3), 128, dtype=np.uint8)).save(image)
    assert load_image_file(image)[0].shape == (3, 40, 36)

    rc = main(["--checkpoint", str(ckpt), "--images", "1", "--out", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr()
    record = json.loads((tmp_path / "a" / "receptive_field.json").read_text())
    assert list(record["models"]) == ["resnet10t+gcn_br"] and record["images"][0]["name"] == "2008_000001"

    rc = main(["--checkpoint", str(ckpt), "--image", str(image), "--point", "3,4", "--out", str(tmp_path / "b")])
    assert rc == 0, capsys.readouterr()
    record = json.loads((tmp_path / "b" / "receptive_field.json").read_text())
    assert record["images"] == [{"name": "picture", "size": [40, 36], "point": [3, 4], "point_source": "given"}]


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet10t:gcn"], "no images"),
    (["--model", "resnet10t:gcn", "--data-root", "{tmp}/missing"], "missing does not exist"),
    (["--model", "nohead", "--data-root", "{voc}"], "expected BACKBONE:HEAD"),
    (["--model", "resnet10t:big", "--data-root", "{voc}"], "unknown head 'big'"),
    (["--model", "no_such_net:gcn", "--data-root", "{voc}"], "unknown backbone 'no_such_net'"),
    (["--checkpoint", "{tmp}/none.pth"], "none.pth does not exist"),
    (["--data-root", "{voc}"], "no model"),
    (["--model", "resnet10t:gcn", "--data-root", "{voc}", "--point", "48,3"], "outside the 48x64"),
    (["--model", "resnet10t:gcn", "--image", "{tmp}/nope.jpg"], "nope.jpg does not exist"),
    (["--model", "resnet10t:gcn", "--data-root", "{voc}", "--split", "test"], "unknown voc split 'test'"),
])
def test_cli_errors_exit_2_naming_the_problem(voc, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, voc=voc) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_malformed_arguments_exit_2(capsys):
    for argv in (["--point", "3"], ["--scales", "1,x"], ["--share", "1.5"]):
        with pytest.raises(SystemExit) as e:
            main(["--model", "resnet10t:gcn", *argv])
        assert e.value.code == 2
    assert "share must be in (0, 1]" in capsys.readouterr().err


def test_module_runs_from_the_command_line():
    proc = run_watched([sys.executable, "-m", "experiments.receptive_field", "--help"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "valid receptive field" in proc.stdout.lower() and "--model resnet50:baseline" in proc.stdout
