"""Benchmarks: the training step (ours vs open_clip's) and the A-CLIP data loader.

``python -m aclip.bench [--preset vit_b16|tiny] [--batch N] …`` times one process-run of each
step mode on the same batch and device — plain CLIP, random masking (FLIP), A-CLIP (2 views ×
50 % + EMA teacher + SimCLR + BYOL) through our real ``Trainer.train_step``, and open_clip's own
CLIP training step (its model, ``ClipLoss``, AdamW) — and reports the median step time,
samples/s, peak memory, analytic model FLOPs and MFU, with ratios against our plain CLIP.

``python -m aclip.bench loader …`` writes img2dataset-style shards of photo-like 256-px JPEGs and
measures the full A-CLIP sample path (decode, two online views, EMA view, boxes, tokens) through
``aclip.data.pipeline.build_train_loader``: samples/s per worker core.

Both print a table and write JSON (``--json``).
"""
