"""Valid receptive field (VRF) of a score-map location: the paper's Figure 3.

Peng et al. show (Figure 3) the *valid receptive field* of the score map at the centre of an object:
the input pixels that actually move that score. A plain FCN's theoretical receptive field covers
the whole image, but its VRF covers little more than the object (A) and no longer holds it when the
image is enlarged (B); a GCN head enlarges it (C). The term and the measure come from Luo et al.,
"Understanding the effective receptive field in deep convolutional neural networks" (the paper's
[38]), which calls it the *effective* receptive field.

How it is computed here, for one network, one image and one location ``(row, col)``:

1. the network (eval mode) maps the normalised image to logits of the image's size;
2. the *score* is one logit at that location: by default the logit of the class the network predicts
   there (``target='predicted'``), or a given class, or the sum over classes (``target='sum'``);
3. the heat map is ``|d score / d input|`` summed over the colour channels (H x W);
4. the VRF is the smallest set of pixels holding ``share`` (default 90%) of the heat map's total
   mass: pixels sorted by heat, largest first, counted until the cumulative sum reaches ``share``.

Its size is reported as the pixel count (*area*), as a fraction of the image, and as the side of the
square of that area (``sqrt(area)`` px). A location whose score does not depend on the input at all
(an all-zero gradient, e.g. a dead ReLU path) has area 0 and ``zero_gradient`` set.

Unless a location is given, each image's is the centre of its object: of the largest labelled class
region (background 0 and void 255 excluded), the pixel farthest from the region's boundary (the image
border counts as boundary; ties go to the deepest pixel nearest the mean of the deepest ones). An
image without a label or without an object uses the image centre ``(H // 2, W // 2)``.

At input scale ``s`` (the paper's (B)) the image is resized by ``s`` before the network and the
location moves with it; areas are then pixels of the resized image, and the fraction is of it.

The package: ``measure`` (the VRF of one location, where to look, scales, several models and images,
the JSON record), ``draw`` (the Figure 3 grid), ``report`` (measure, draw and save; the printed
summary), ``cli`` (the command line). The images come from ``experiments.imaging``.

Run it::

    # a fine-tuned network on the first 4 images of its own validation split
    python -m experiments.receptive_field --checkpoint runs/seg/voc_gcn/final.pth
    # baseline (1x1 score maps) vs GCN k=15 on the same random backbone, at scales 1 and 2
    python -m experiments.receptive_field --model resnet50:baseline --model resnet50:gcn \\
        --data-root data/VOCdevkit --scales 1,2
    # any picture, a chosen location (row, column in input pixels)
    python -m experiments.receptive_field --checkpoint final.pth --image bird.jpg --point 180,250

It writes ``receptive_field.png`` (rows: images; columns: the input, then the heat map of each
model and scale with its VRF outlined and the location marked) and ``receptive_field.json`` (areas
per model, scale and image, and their means) into ``--out`` (default ``vrf/``).
"""
from __future__ import annotations

from experiments.imaging import load_image_file, load_images_from_split

from .cli import UsageError, build_parser, main
from .draw import draw_receptive_fields, receptive_field_grid
from .measure import (
    DEFAULT_SHARE,
    VRF,
    VRFComparison,
    compare_receptive_fields,
    default_point,
    object_centre,
    scale_input,
    valid_receptive_field,
    vrf_area,
)
from .report import FIGURE_NAME, JSON_NAME, format_summary, receptive_field_report

__all__ = [
    "DEFAULT_SHARE",
    "FIGURE_NAME",
    "JSON_NAME",
    "VRF",
    "VRFComparison",
    "valid_receptive_field",
    "vrf_area",
    "object_centre",
    "default_point",
    "scale_input",
    "compare_receptive_fields",
    "receptive_field_grid",
    "draw_receptive_fields",
    "receptive_field_report",
    "format_summary",
    "load_images_from_split",
    "load_image_file",
    "UsageError",
    "build_parser",
    "main",
]
