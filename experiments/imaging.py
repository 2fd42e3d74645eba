"""What the comparison's pictures and the receptive-field tool share.

Display names of backbones and heads (``DISPLAY``, also the table's), matplotlib without a display
(``pyplot`` and ``new_figure``, with one message when it is missing), a normalised input shown as it
looks (``display_image``), and the images of a data set split: raw (``split_dataset``, what Figure 6
shows) or as network inputs with their labels (``split_images``, ``load_images_from_split``), and any
image file as a network input (``load_image_file``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the data sets are imported when an image is loaded: the table needs neither
    import matplotlib.figure
    import numpy as np
    import torch

    from segmentation.datasets import SegmentationDataset

__all__ = ["DISPLAY", "pyplot", "new_figure", "display_image", "split_dataset", "split_images",
           "load_images_from_split", "load_image_file"]

DISPLAY = {"resnet50": "ResNet50", "resnet50_gcn": "ResNet50-GCN", "baseline": "Baseline", "gcn": "GCN",
           "gcn_br": "GCN + BR", "conv": "Conv", "stack": "Stack"}


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the figures need matplotlib: pip install -e '.[extras]' (make setup installs it)") from e
    return matplotlib


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    _matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(**kwargs) -> matplotlib.figure.Figure:
    """A Figure outside pyplot (no global state, Agg canvas by default); ``kwargs`` go to ``Figure``."""
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def display_image(x: torch.Tensor) -> np.ndarray:
    """Normalised 3 x H x W -> H x W x 3 in [0, 1], as the image looks."""
    import torch

    from segmentation.transforms import MEAN, STD

    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def split_dataset(root: str | Path, split: str, n: int, dataset: str = "voc",
                  sbd_root: str | Path | None = None) -> tuple[SegmentationDataset, list[str]]:
    """The first ``n`` images of a split (``.load(i)``: raw uint8 image, label) and their names."""
    from segmentation.datasets import SegmentationDataset, build_samples, dataset_info

    num_classes, _ = dataset_info(dataset)
    samples = build_samples(dataset, split, root, sbd_root)[:n]
    return SegmentationDataset(samples, num_classes), [s.name for s in samples]


def split_images(root: str | Path, split: str, n: int, dataset: str = "voc",
                 sbd_root: str | Path | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The first ``n`` (>= 1) images of a split as network inputs with their labels, and their names."""
    import torch

    from segmentation.transforms import eval_transform

    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    data, names = split_dataset(root, split, n, dataset, sbd_root)
    to_input = eval_transform()
    images = []
    for i in range(len(data)):
        x, label = to_input(*data.load(i))
        images.append((x.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)))
    return images, names


def load_images_from_split(root: str | Path, split: str = "val", n: int = 4, dataset: str = "voc",
                           sbd_root: str | Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of a data set split as ``(normalised 3xHxW float, HxW int64 label)`` pairs."""
    return split_images(root, split, n, dataset, sbd_root)[0]


def load_image_file(path: str | Path) -> tuple[torch.Tensor, None]:
    """Any image file (JPEG, PNG...) as ``(normalised 3xHxW float tensor, None)``."""
    import torch
    from torchvision import tv_tensors

    from segmentation.datasets import read_image
    from segmentation.transforms import eval_transform

    image = read_image(Path(path))  # DatasetError naming the file when missing or unreadable
    x = eval_transform()(tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1)))
    return x.as_subclass(torch.Tensor), None
