"""Procedural image-text shards for the demo: small coloured shapes on cluttered backgrounds.

Train shards follow img2dataset's layout (`train/00000.tar` with `key.jpg/.txt/.json`, plus
`00000_stats.json` and `sizes.json`); evaluation sets follow CLIP_benchmark's webdataset layout
(`eval_cls/` labelled by shape and `eval_colour/`, the same images labelled by the colour of
their one object, with `.cls` labels; `eval_ret/` with 5 newline-separated captions per image).
Every sample is drawn from its own seeded RNG, so the output bytes depend only on the seed.

    python -m aclip.data.synthetic --out DIR [--n-train N --n-eval-cls N --n-eval-ret N
                                   --image-size S --samples-per-shard M --seed K --workers W
                                   --object-radius LO HI]
                                   [--n-eval-seg N [--seg-only]]

``--n-eval-seg N`` also writes ``eval_seg/``: N scenes with per-pixel masks (background and one
class per colour) in the generic segmentation layout of ``aclip.data.sets.segmentation``.

``--n-train-region N`` / ``--n-eval-region N`` also write Alpha-CLIP's region data: scenes of
2-4 objects of different shapes and colours in an overlapping cluster, so that neither the whole
image nor a region's bounding box says which object is meant (the mask does);
``train_region/`` img2dataset shards whose ``.json`` lists each object's region (``caption``
naming it, ``mask`` as COCO RLE) beside the full caption in ``.txt``, and ``eval_region/``, a
CLIP_benchmark-style classification set (classes: the colours) with one object's mask per
sample as ``.mask.png``. ``--region-only`` writes only these.

Modules: ``scenes`` (vocabulary, drawing, captions, one sample), ``shards`` (the image-text
shards and sets), ``segmentation``, ``regions``; the command line in ``__main__``.
"""

from aclip.data.synthetic.regions import (
    REGION_TEMPLATE,
    make_region_sample,
    region_classnames,
    render_region_scene,
    write_region_sets,
)
from aclip.data.synthetic.scenes import (
    CLS_TEMPLATES,
    COLOUR_TEMPLATES,
    COLOURS,
    OBJECT_RADIUS,
    SHAPES,
    caption,
    make_sample,
    render_scene,
)
from aclip.data.synthetic.segmentation import (
    make_seg_sample,
    render_seg_scene,
    seg_classnames,
    write_segmentation_set,
)
from aclip.data.synthetic.shards import write_synthetic

__all__ = [
    "CLS_TEMPLATES",
    "COLOUR_TEMPLATES",
    "COLOURS",
    "OBJECT_RADIUS",
    "REGION_TEMPLATE",
    "SHAPES",
    "caption",
    "make_region_sample",
    "make_sample",
    "make_seg_sample",
    "region_classnames",
    "render_region_scene",
    "render_scene",
    "render_seg_scene",
    "seg_classnames",
    "write_region_sets",
    "write_segmentation_set",
    "write_synthetic",
]
