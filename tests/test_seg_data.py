"""Segmentation data: VOC / SBD / train_aug / Cityscapes loaders against fixtures in the real formats,
bad-input errors, and the joint image/mask augmentation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from seg_fixtures import CLASS_COLOURS, make_cityscapes, make_sbd, make_voc, scenes, write_vocdevkit

from segmentation.datasets import (
    CITYSCAPES_CLASSES,
    DatasetError,
    SegmentationDataset,
    build_samples,
    voc_palette,
)
from segmentation.transforms import MEAN, STD, eval_transform, train_transform

# cityscapesScripts' table, written out independently of the loader's: (label id, train id)
OFFICIAL = [(0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1), (9, 255),
            (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5), (18, 255), (19, 6),
            (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (29, 255),
            (30, 255), (31, 16), (32, 17), (33, 18)]


def _decoded(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_voc_palette_matches_devkit_colours() -> None:
    p = voc_palette()
    # VOClabelcolormap: background black, aeroplane (128,0,0), person (192,128,128), void (224,224,192)
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0] and p[15].tolist() == [192, 128, 128]
    assert p[255].tolist() == [224, 224, 192]


def test_voc_loader_pixel_for_pixel(tmp_path: Path) -> None:
    images, masks = scenes(5, 0, [(40, 52), (33, 47), (40, 52), (21, 30), (40, 52)], [1, 2, 3], void_band=1)
    devkit = write_vocdevkit(tmp_path, images, masks, train_ids=[0, 1, 2], val_ids=[3, 4])
    base = devkit / "VOC2012"
    assert Image.open(base / "SegmentationClass/2008_000000.png").mode == "P"
    for split, ids in (("train", [0, 1, 2]), ("val", [3, 4])):
        ds = SegmentationDataset(build_samples("voc", split, devkit), 21)
        assert [s.name for s in ds.samples] == [f"2008_{i:06d}" for i in ids]
        for k, i in enumerate(ids):
            image, mask = ds[k]
            assert mask.dtype == torch.uint8 and np.array_equal(mask.numpy(), masks[i])
            assert 255 in mask.unique().tolist()  # the void band survives
            expected = _decoded(base / "JPEGImages" / f"2008_{i:06d}.jpg")
            assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
            for c in set(np.unique(masks[i]).tolist()) - {255}:  # the image written: class colours where drawn
                assert np.abs(expected[masks[i] == c].mean(0) - CLASS_COLOURS[c]).max() < 25  # colours are >= 100 apart
    # the VOCdevkit folder, VOC2012 and the folder above are all accepted
    assert len(build_samples("voc", "trainval", base)) == len(build_samples("voc", "trainval", tmp_path)) == 5


def test_sbd_mat_and_train_aug(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    devkit = make_voc(tmp_path, n_train=4, n_val=3)  # VOC train 2008_000000-3, val 2008_000004-6
    voc_names = [f"2008_{i:06d}" for i in range(7)]
    sbd_names = ["2008_000001", "2008_000004", "2008_000009", "2008_000010", "2008_000011", "2008_000012"]
    sbd = make_sbd(tmp_path, sbd_names, train=sbd_names[:3], val=sbd_names[3:])
    _, sbd_masks = scenes(len(sbd_names), 1, (40, 52), [1, 2, 3])

    sbd_val = SegmentationDataset(build_samples("voc", "sbd_val", devkit, sbd), 21)
    for k, s in enumerate(sbd_val.samples):
        assert s.label.suffix == ".mat"
        assert np.array_equal(sbd_val[k][1].numpy(), sbd_masks[sbd_names.index(s.name)])

    capsys.readouterr()
    aug = build_samples("voc", "train_aug", devkit, sbd)
    printed = capsys.readouterr().out
    # (VOC train {0,1,2,3} + SBD {1,4,9,10,11,12}) - VOC val {4,5,6}
    want = sorted({voc_names[i] for i in range(4)} | set(sbd_names) - {voc_names[i] for i in (4, 5, 6)})
    assert [s.name for s in aug] == want and len(aug) == 8
    assert "train_aug: 8 images" in printed and "4 with VOC labels, 4 with SBD labels" in printed
    both = next(s for s in aug if s.name == "2008_000001")  # in VOC train and SBD train: VOC wins
    assert both.label_format == "png" and both.label.parent.name == "SegmentationClass"
    assert not any(s.name == "2008_000004" for s in aug)  # SBD lists it, but it is VOC val


def test_cityscapes_fine_and_coarse(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_cityscapes(tmp_path)
    table = dict(OFFICIAL)
    fine = SegmentationDataset(build_samples("cityscapes", "train", root), len(CITYSCAPES_CLASSES))
    assert [s.name for s in fine.samples] == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019"]
    for k, s in enumerate(fine.samples):
        ids = np.asarray(Image.open(s.label))
        expected = np.vectorize(table.get)(ids).astype(np.uint8)
        image, mask = fine[k]
        assert np.array_equal(mask.numpy(), expected)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), _decoded(s.image))
    assert {int(v) for v in fine[0][1].unique()} <= set(range(19)) | {255}
    assert [s.name for s in build_samples("cityscapes", "val", root)] == ["frankfurt/frankfurt_000000_000019"]
    mixed = build_samples("cityscapes", "train_coarse", root)
    assert len(mixed) == 4 and sum("gtCoarse" in str(s.label) for s in mixed) == 2
    assert "train_coarse: 4 images = fine train 2 + coarse train_extra 2" in capsys.readouterr().out


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path / "a", n_train=2, n_val=1)
    base = devkit / "VOC2012"
    with pytest.raises(DatasetError, match=r"no PASCAL VOC 2012 under .*nowhere"):
        build_samples("voc", "train", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"unknown voc split 'tain'.*train_aug"):
        build_samples("voc", "tain", devkit)
    with pytest.raises(DatasetError, match=r"needs SBD.*sbd_root"):
        build_samples("voc", "train_aug", devkit)

    (base / "SegmentationClass/2008_000001.png").unlink()
    with pytest.raises(DatasetError, match=r"2008_000001\.jpg has no label: .*2008_000001\.png does not exist"):
        build_samples("voc", "train", devkit)

    devkit = make_voc(tmp_path / "b", n_train=3, n_val=1)
    base = devkit / "VOC2012"
    ds = SegmentationDataset(build_samples("voc", "train", devkit), 21)
    bad = np.asarray(Image.open(base / "SegmentationClass/2008_000000.png")).copy()
    bad[0, :3] = 30
    Image.fromarray(bad).save(base / "SegmentationClass/2008_000000.png")
    with pytest.raises(DatasetError, match=r"2008_000000\.png holds values \[30\] outside the 21 classes"):
        ds[0]
    Image.new("RGB", (10, 10)).save(base / "SegmentationClass/2008_000001.png")
    with pytest.raises(DatasetError, match=r"2008_000001\.png is a RGB image; expected a palette"):
        ds[1]
    Image.fromarray(np.zeros((12, 9), np.uint8)).save(base / "SegmentationClass/2008_000002.png")
    with pytest.raises(DatasetError, match=r"2008_000002\.jpg is 52x40 but its label .* is 9x12"):
        ds[2]
    (base / "JPEGImages/2008_000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*2008_000002\.jpg"):
        ds[2]

    root = make_cityscapes(tmp_path / "c")
    next((root / "gtFine/train/aachen").glob("*_labelIds.png")).unlink()
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_leftImg8bit\.png has no label"):
        build_samples("cityscapes", "train", root)
    shutil.rmtree(root / "gtCoarse")
    with pytest.raises(DatasetError, match=r"Cityscapes label folder .*gtCoarse/train_extra does not exist"):
        build_samples("cityscapes", "coarse_train_extra", root)


def _flat_pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import tv_tensors

    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 4, size=(h // 4, w // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
    image = CLASS_COLOURS[mask].astype(np.uint8)
    return (tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask)))


def test_train_transform_moves_image_and_mask_together() -> None:
    image, mask = _flat_pair(24, 36, 0)
    colours = (torch.tensor(CLASS_COLOURS[:4], dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    pad = torch.zeros(3)  # the mean pixel after normalisation (to rounding)
    t = train_transform(32, scale=(1.0, 1.0))
    seen_flip = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
        # every label pixel sits under a pixel of its class colour; padded label pixels under the mean pixel
        labelled = y != 255
        assert torch.allclose(x.permute(1, 2, 0)[labelled], colours[y[labelled]], atol=1e-5)
        assert torch.allclose(x.permute(1, 2, 0)[~labelled], pad.expand(int((~labelled).sum()), 3), atol=0.02)
        assert int(labelled.sum()) == 24 * 32  # pad to 32 rows, crop 32 of 36 columns
        seen_flip.add(bool(torch.equal(y[:24], torch.flip(mask[:, :32], dims=[1]).long())))
    assert len(seen_flip) == 2 or seen_flip == {False}  # flips happen (and crops)


def test_random_scale_range_and_seeded_samples(tmp_path: Path) -> None:
    image, mask = _flat_pair(40, 40, 1)
    t = train_transform(48, scale=(0.5, 2.0))
    counts = []
    for seed in range(10):
        torch.manual_seed(seed)
        _, y = t(image, mask)
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
        counts.append(int((y != 255).sum()))
    assert min(counts) < 40 * 40 and max(counts) == 48 * 48  # shrunk below the crop, and grown past it
    assert eval_transform()(image, mask)[1].shape == (40, 40)

    devkit = make_voc(tmp_path, n_train=2, n_val=1)
    ds = SegmentationDataset(build_samples("voc", "train", devkit), 21, train_transform(32))
    a, b, c = ds[(1, 7)], ds[(1, 7)], ds[(1, 8)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
