"""Training-free open-vocabulary segmentation with a CLIP's dense features.

``heads`` (the dense heads: vanilla, MaskCLIP, SCLIP, ClearCLIP, CLIPer), ``settings`` (how a
head segments a dataset, and the text queries), ``protocols`` (the CLIP and CLIPer inference
protocols), ``segment`` (:class:`~aclip.dense.segment.Segmenter`: one head on one image),
``metric`` (mIoU, pixel accuracy), ``evaluate`` (every head over a dataset), ``sd`` (the Stable
Diffusion refinement). The command line is ``python -m evals.segmentation``.
"""
