"""Studies: experiments made of many runs or evaluations, and their tables and figures.

Rank 6 of the layer rule: a study may use training (``aclip.train``), dense heads, evaluation,
interop, methods, data, model and the foundations; the command lines (``evals/``, ``train.py``)
call it and never the other way round.

- :mod:`aclip.studies.keep_ratio_runs`: the token-keep-ratio training study (a grid of masking
  configs, one ``train.py`` run each; equal steps, equal FLOPs or equal wall time).
- :mod:`aclip.studies.keep_ratio`: one model evaluated at several eval-time keep ratios.
- :mod:`aclip.studies.keep_ratio_report` / :mod:`aclip.studies.keep_ratio_plots`: their result
  tables and figures.
- :mod:`aclip.studies.recipe` / :mod:`aclip.studies.recipe_report`: the recipe study (named
  variants of config overrides, one ``train.py`` run per variant and seed) and its report.
- :mod:`aclip.studies.probe`: the linear probe and prompt similarity of one model on a set.
- :mod:`aclip.studies.supervised_ceiling`: a config's vision tower trained on a set's labels.
"""
