"""Reproducible pretraining: the loader's crops and flips follow (seed, epoch, sample index) (backbone/augment.py),
so two runs give the same weights and a run killed and resumed ends with the uninterrupted run's weights.

On striped, noisy images (conftest's ``textured_betons``), where a different crop or flip changes the batch.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hangs import PYTHON, ROOT, run_watched
from imagenet_fixture import load_rgb

from backbone.augment import CROP_STREAM, FLIP_STREAM, SeededRandomResizedCropRGBImageDecoder
from backbone.data import IMAGENET_MEAN, IMAGENET_STD, epoch_batches, make_train_loader, set_epoch
from backbone.write_beton import scan_imagefolder

CPU = torch.device("cpu")
TINY = ROOT / "configs/pretrain/tiny_cpu.yaml"
SEED = int(os.environ.get("LKM_FAULT_SEED", "14"))  # the kill points (as in test_faults.py)


# --- a pure-Python statement of the documented draws (backbone/augment.py), independent of its numba code -----
_MASK, _GOLDEN = 2**64 - 1, 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _key(seed: int, epoch: int, index: int, stream: int) -> int:
    k = _mix((seed + _GOLDEN) & _MASK)
    k = _mix(k ^ ((stream * _GOLDEN) & _MASK))
    k = _mix(k ^ ((epoch + _GOLDEN) & _MASK))
    return _mix(k ^ ((index + _GOLDEN) & _MASK))


def _uniform(key: int, n: int) -> float:
    return (_mix((key + (n + 1) * _GOLDEN) & _MASK) >> 11) / 2**53


def _crop_box(height: int, width: int, key: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params, its numbers from the stream ``key``."""
    log_ratio = np.log(ratio)
    for attempt in range(10):
        n = 4 * attempt
        area = height * width * (scale[0] + (scale[1] - scale[0]) * _uniform(key, n))
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(key, n + 1))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(_uniform(key, n + 2) * (height - h + 1)), int(_uniform(key, n + 3) * (width - w + 1)), h, w
    in_ratio = width / height
    w, h = (width, round(width / min(ratio))) if in_ratio < min(ratio) else \
        (round(height * max(ratio)), height) if in_ratio > max(ratio) else (width, height)
    return (height - h) // 2, (width - w) // 2, h, w


def _expected_image(image: np.ndarray, seed: int, epoch: int, index: int, res: int) -> np.ndarray:
    i, j, h, w = _crop_box(*image.shape[:2], _key(seed, epoch, index, CROP_STREAM))
    out = cv2.resize(np.ascontiguousarray(image[i:i + h, j:j + w]), (res, res), interpolation=cv2.INTER_AREA)
    return out[:, ::-1] if _uniform(_key(seed, epoch, index, FLIP_STREAM), 0) < 0.5 else out


def _unnormalise(images: torch.Tensor) -> np.ndarray:
    x = images.permute(0, 2, 3, 1).double().numpy() * IMAGENET_STD + IMAGENET_MEAN
    return np.rint(x).clip(0, 255).astype(np.uint8)


def _epoch(loader, epoch: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    set_epoch(loader, epoch)
    images, labels = [], []
    for x, y in epoch_batches(loader, skip=skip):
        images.append(_unnormalise(x))  # copies: ffcv reuses its buffers
        labels.append(y.clone().numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_per_sample_numbers_are_uniform_and_independent_across_samples_epochs_and_streams() -> None:
    """The compiled streams (backbone.augment) against U(0, 1): a Kolmogorov-Smirnov test per source of variation,
    and no correlation between neighbouring samples, epochs, streams or draws (|r| under 4 standard errors)."""
    from scipy import stats

    from backbone.augment import sample_key, uniform

    n = 4000
    draws = np.array([[uniform(np.uint64(sample_key(3, epoch, index, stream)), k) for index in range(n)]
                      for epoch, stream, k in ((0, CROP_STREAM, 0), (1, CROP_STREAM, 0), (0, FLIP_STREAM, 0),
                                               (0, CROP_STREAM, 1))])
    assert ((draws >= 0) & (draws < 1)).all()
    for row in draws:
        assert stats.kstest(row, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(draws[0, :-1], draws[0, 1:])[0, 1]) < 4 / np.sqrt(n)  # sample i and i + 1
    for other in draws[1:]:  # another epoch, the other stream, the next draw of the stream
        assert abs(np.corrcoef(draws[0], other)[0, 1]) < 4 / np.sqrt(n)
    assert draws[0].tolist() == [_uniform(_key(3, 0, i, CROP_STREAM), 0) for i in range(n)]  # the reference


# --- the loader ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_train(textured_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The textured training images stored as raw pixels (no JPEG round trip: the reference crops them exactly)."""
    out = tmp_path_factory.mktemp("raw") / "train_raw.beton"
    run_watched([PYTHON, "-m", "backbone.write_beton", "--data-dir", str(textured_betons["train_dir"]), "--out",
                 str(out), "--write-mode", "raw", "--max-resolution", "0", "--num-workers", "1"], check=True)
    return out


@pytest.fixture(scope="module")
def loaders(raw_train: Path) -> dict[str, object]:
    """Two loaders with the same seed, different threads and batch sizes (the reference test pins the seed's part)."""
    def make(workers: int, batch: int, seed: int):
        return make_train_loader(raw_train, batch_size=batch, num_workers=workers, resolution=24, device=CPU,
                                 seed=seed)
    return {"one_thread": make(1, 8, 5), "two_threads": make(2, 16, 5)}


def test_crops_and_flips_are_the_documented_function_of_seed_epoch_and_sample(raw_train: Path, loaders: dict,
                                                                             textured_betons: dict) -> None:
    samples = scan_imagefolder(textured_betons["train_dir"]).samples  # the .beton's sample order
    for epoch in (0, 3):
        images, labels = _epoch(loaders["one_thread"], epoch)
        order = np.random.default_rng(5 + epoch).permutation(len(samples))  # data.py's documented order
        assert labels.tolist() == [samples[k][1] for k in order]
        flipped = 0
        for image, index in zip(images, order, strict=True):
            expected = _expected_image(load_rgb(samples[index][0]), 5, epoch, int(index), 24)
            diff = np.abs(image.astype(int) - expected.astype(int))
            assert diff.max() <= 2, f"epoch {epoch}, sample {index}: off by up to {diff.max()} from the reference"
            flipped += _uniform(_key(5, epoch, int(index), FLIP_STREAM), 0) < 0.5
        assert 0 < flipped < len(order)


def test_batches_depend_on_seed_epoch_and_sample_only(loaders: dict) -> None:
    """Not on the decoding threads or the batch size; a new epoch crops anew; a resumed epoch replays."""
    one, _ = _epoch(loaders["one_thread"], 2)
    two, _ = _epoch(loaders["two_threads"], 2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(_epoch(loaders["two_threads"], 2, skip=3)[0], two[3 * 16:])
    other = _epoch(loaders["one_thread"], 1)[0]  # the same samples in another order, each cropped anew
    by_sample = [dict(zip(np.random.default_rng(5 + e).permutation(len(x)).tolist(), x, strict=True))
                 for e, x in ((2, one), (1, other))]
    assert np.mean([np.array_equal(by_sample[0][k], by_sample[1][k]) for k in by_sample[0]]) < 0.05
    np.testing.assert_array_equal(_epoch(loaders["one_thread"], 2)[0], one)  # after other epochs: the same again


def test_seeded_operations_refuse_a_plain_ffcv_loader(raw_train: Path) -> None:
    from ffcv.loader import Loader

    with pytest.raises(TypeError, match="needs backbone.augment.SeededLoader"):
        Loader(str(raw_train), batch_size=4, num_workers=1, pipelines={
            "image": [SeededRandomResizedCropRGBImageDecoder((8, 8), seed=0)], "label": None})


# --- pretraining ---------------------------------------------------------------------------------------------
def _overrides(betons: dict[str, Path], run_dir: Path) -> list[str]:
    return [f"data.train={betons['train']}", f"data.val={betons['val']}", f"run.dir={run_dir}", "train.epochs=2"]


@pytest.fixture(scope="module")
def straight(textured_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/pretrain/tiny_cpu.yaml (train.deterministic=true), 2 epochs of 8 steps, straight through."""
    run_dir = tmp_path_factory.mktemp("textured") / "straight"
    run_watched([PYTHON, "-m", "backbone.train", "--config", str(TINY), *_overrides(textured_betons, run_dir)],
                check=True, env=_env())
    return run_dir


def _env() -> dict[str, str]:
    """One thread (sums then do not depend on the machine), no SLURM job (signals are the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pth", weights_only=True)["state_dict"]


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_two_pretraining_runs_give_the_same_weights(straight: Path, textured_betons: dict[str, Path],
                                                    tmp_path: Path) -> None:
    run_watched([PYTHON, "-m", "backbone.train", "--config", str(TINY), *_overrides(textured_betons, tmp_path)],
                check=True, env=_env())
    assert _losses(tmp_path) == _losses(straight)  # every step (tiny_cpu records each one)
    assert _differing(_weights(straight), _weights(tmp_path)) == []


# Dies at step ``at`` after the forward and backward passes (kill -9 before the update), or gets SIGTERM there (a
# signal outside SLURM: checkpoint at the step boundary, exit).


@pytest.mark.slow
def test_pretraining_killed_at_random_moments_resumes_to_the_uninterrupted_weights(
        straight: Path, textured_betons: dict[str, Path], tmp_path: Path) -> None:
    from engine import checkpoint as ckpt

    rng = random.Random(SEED)
    signalled, killed = rng.randint(2, 6), rng.randint(10, 15)  # mid first epoch; mid second (8 steps each)
    args = ["--config", str(TINY), *_overrides(textured_betons, tmp_path)]
    first = run_watched([PYTHON, "-m", "children.interrupted_pretraining", str(signalled), "term", *args], env=_env())
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-5000:]
    assert [ckpt.peek_checkpoint(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [signalled]
    # resumes mid-epoch (the loader replays the epoch's first batches and drops them), then dies in the second
    second = run_watched([PYTHON, "-m", "children.interrupted_pretraining", str(killed), "kill", *args], env=_env())
    assert second.returncode == -signal.SIGKILL, second.stderr[-5000:]
    assert ckpt.peek_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])["step"] == 8
    assert not (tmp_path / "final.pth").exists()
    run_watched([PYTHON, "-m", "backbone.train", *args], check=True, env=_env())  # from the end of the first epoch
    assert _losses(tmp_path) == _losses(straight), f"signalled at step {signalled}, killed at {killed}"
    different = _differing(_weights(straight), _weights(tmp_path))
    assert different == [], f"signalled at step {signalled}, killed at {killed}: differs in {different[:5]}"
