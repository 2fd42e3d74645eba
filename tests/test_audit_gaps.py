"""Four deliberate one-line breaks that a mutation audit made and no test caught (issue 23): the blur filter, the
CRF's Gaussian kernel weight, the recipe hash's excluded keys and the file-hash cache. Each test here fails on its
break."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone.antialias import BlurConv2d, apply_blurpool
from backbone.models import create_backbone
from engine.config import load_config
from engine.provenance import config_recipe_hash, file_sha256

ROOT = Path(__file__).resolve().parents[1]


# --- the blur filter ------------------------------------------------------------------------------------------
def test_blur_filter_is_the_binomial_for_every_channel() -> None:
    binomial = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    model = create_backbone("resnet18", num_classes=4)
    blurred = apply_blurpool(model)
    assert blurred  # resnet18 has strided convs with >= 16 input channels
    for name in blurred:
        conv = model.get_submodule(name)
        assert conv.blur_filter.shape == (conv.in_channels, 1, 3, 3), name
        for c in range(conv.in_channels):
            assert torch.equal(conv.blur_filter[c, 0], binomial), (name, c)


def test_blurred_conv_output_is_the_hand_worked_one() -> None:
    """A 1x1 stride-2 conv over two channels, blurred first: channel 0 holds 16 at (0, 0) and at (1, 1), channel 1
    holds 16 at (2, 2); the conv adds channel 0 and 10 x channel 1. The blur (zero padding, per channel) spreads
    each 16 as [1 2 1; 2 4 2; 1 2 1]; the stride-2 conv reads the even positions of the 5x5 map (a box filter
    would spread 16/9 everywhere, a blur mixing channels would leak channel 1 into (0, 1)).
    """
    conv = BlurConv2d(2, 1, kernel_size=1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 10.0]).view(1, 2, 1, 1))
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = 16
    x[0, 1, 2, 2] = 16
    # blur of channel 0 at the even positions (rows/cols 0, 2, 4): (0,0) = 4 + 1, (0,2) = 1, (2,0) = 1, (2,2) = 1;
    # blur of channel 1 at the even positions: (2,2) = 4 only (its corners land on odd positions)
    expected = torch.tensor([[5.0, 1.0, 0.0],
                             [1.0, 1.0 + 10 * 4.0, 0.0],
                             [0.0, 0.0, 0.0]])
    with torch.no_grad():
        out = conv(x)
    assert out.shape == (1, 1, 3, 3)
    assert torch.equal(out[0, 0], expected), out[0, 0]


# --- the CRF's Gaussian kernel weight ---------------------------------------------------------------------------
def _island() -> tuple[np.ndarray, np.ndarray]:
    """A flat grey image and class probabilities favouring class 0 everywhere but one pixel (class 1 there)."""
    image = np.full((9, 9, 3), 128, np.uint8)
    probs = np.zeros((2, 9, 9), np.float32)
    probs[0], probs[1] = 0.7, 0.3
    probs[:, 4, 4] = (0.3, 0.7)
    return image, probs


def test_crf_gaussian_kernel_alone_removes_an_isolated_pixel() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    from segmentation.crf import CRFParams, crf_labels

    image, probs = _island()
    assert probs.argmax(0)[4, 4] == 1
    labels = crf_labels(image, probs, CRFParams(bi_w=0.0, pos_w=3.0))  # only the smoothness kernel acts
    assert (labels == 0).all(), labels


def test_crf_with_both_kernel_weights_zero_returns_the_unary_argmax() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    from segmentation.crf import CRFParams, crf_labels

    image, probs = _island()
    assert np.array_equal(crf_labels(image, probs, CRFParams(bi_w=0.0, pos_w=0.0)), probs.argmax(0))
    rng = np.random.default_rng(0)  # a noisy 3-class field on a noisy image: nothing pulls any pixel either
    noisy = rng.random((3, 12, 10)).astype(np.float32) + 0.05
    noisy /= noisy.sum(0, keepdims=True)
    guide = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    assert np.array_equal(crf_labels(guide, noisy, CRFParams(bi_w=0.0, pos_w=0.0)), noisy.argmax(0))


# --- the recipe hash --------------------------------------------------------------------------------------------
STAGES = {
    "pretrain": ("backbone.train", "PretrainConfig", "configs/pretrain/tiny_cpu.yaml",
                 ["run.dir=/elsewhere/run", "data.train=/other/train.beton", "data.val=/other/val.beton",
                  "run.log_every_s=1", "run.check_every_steps=7", "data.num_workers=2"]),
    "finetune": ("segmentation.finetune", "FinetuneConfig", "configs/segmentation/tiny_cpu.yaml",
                 ["run.dir=/elsewhere/run", "data.root=/other/VOCdevkit", "data.sbd_root=/other/sbd",
                  "model.pretrained=/other/final.pth", "run.log_every_s=1", "run.check_every_steps=7"]),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_recipe_hash_ignores_paths_and_logging_and_follows_the_learning_rate(stage: str) -> None:
    import importlib

    module, name, config, moved = STAGES[stage]
    cls = getattr(importlib.import_module(module), name)
    base = load_config(cls, ROOT / config, ["run.dir=/runs/a"])
    assert set(cls.NOT_RECIPE) >= {key.partition("=")[0] for key in moved}  # the keys moved are all "not recipe"
    for override in moved:  # each alone, then all together: the same recipe
        assert config_recipe_hash(load_config(cls, ROOT / config, ["run.dir=/runs/a", override])) == \
            config_recipe_hash(base), override
    assert config_recipe_hash(load_config(cls, ROOT / config, moved)) == config_recipe_hash(base)
    lr = base.optim.lr
    assert config_recipe_hash(load_config(cls, ROOT / config, ["run.dir=/runs/a", f"optim.lr={lr * 2}"])) != \
        config_recipe_hash(base)


# --- the file-hash cache ----------------------------------------------------------------------------------------
def test_file_hash_sees_a_same_size_rewrite_in_place_within_one_process(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from engine import provenance

    monkeypatch.setattr(provenance, "_SETTLED_NS", 200_000_000)  # files 0.2 s old count as settled (cached)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    time.sleep(0.3)  # settle, so that its hash is kept
    first = file_sha256(path)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest() and file_sha256(path) == first
    settled = os.stat(path)
    with open(path, "r+b") as f:  # in place: same inode, same size, other bytes
        f.write(b"b" * 4096)
    os.utime(path, ns=(settled.st_atime_ns, settled.st_mtime_ns))  # and the modification time put back (cp -p)
    now = os.stat(path)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (settled.st_ino, settled.st_size, settled.st_mtime_ns)
    assert file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()

    # a rewrite right after the first hash, within the file system's timestamp granularity: also seen
    monkeypatch.undo()
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"c" * 100)
    stamp = os.stat(fresh)
    assert file_sha256(fresh) == hashlib.sha256(b"c" * 100).hexdigest()
    fresh.write_bytes(b"d" * 100)
    os.utime(fresh, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert file_sha256(fresh) == hashlib.sha256(b"d" * 100).hexdigest()
