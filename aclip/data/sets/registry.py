"""The evaluation-set formats: how the eval CLIs and the trainer recognise, check and read a set.

A format is one :class:`SetFormat`, registered with :func:`register_set_format` at the end of its
reader file (``wds.py``: CLIP_benchmark webdatasets; ``imagefolder.py``: ImageFolder trees;
``karpathy.py``: Karpathy split json), which ``aclip/data/sets/__init__.py`` imports. A path is
read by the one format of its task that claims it (:func:`find_set_format`), or by a format
named explicitly (:func:`get_set_format`: the CLIs' ``--imagefolder`` and ``--karpathy-json``).

Adding a format: a new file that registers a :class:`SetFormat`, and its import in
``aclip/data/sets/__init__.py``; ``evals.zeroshot --data``, ``evals.retrieval --data`` and the
trainer's ``eval.zeroshot_sets`` / ``eval.retrieval_sets`` then read its sets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# classification: load gives (dataset of (image tensor, label), class names, templates);
# retrieval: load gives a dataset of (image tensor, list of captions)
TASKS = ("classification", "retrieval")


@dataclass(frozen=True)
class SetFormat:
    """One evaluation-set format of one task.

    ``claims(path)`` says whether a path is a set of this format (cheap: names and layout, no
    image decoded; False for a path it does not recognise). ``check(path, **options)`` refuses a
    set that cannot be evaluated, before any model is loaded (FileNotFoundError / ValueError
    naming the problem). ``load(path, transform, **options)`` returns what the evaluators take
    (see ``TASKS``). ``options`` names the keyword options ``check`` and ``load`` accept, each
    with a default; ``expects`` says what a set of the format is, for the error that lists them.
    """

    name: str
    task: str
    expects: str
    claims: Callable[[Path], bool]
    check: Callable[..., None]
    load: Callable[..., Any]
    options: tuple[str, ...] = ()


SET_FORMATS: dict[tuple[str, str], SetFormat] = {}


def register_set_format(fmt: SetFormat) -> SetFormat:
    """Make ``fmt`` readable by :func:`find_set_format` and :func:`get_set_format`."""
    _check_task(fmt.task)
    if not fmt.name or (fmt.name, fmt.task) in SET_FORMATS:
        raise ValueError(f"{fmt.task} set format name {fmt.name!r} is empty or taken")
    SET_FORMATS[(fmt.name, fmt.task)] = fmt
    return fmt


def set_formats(task: str) -> list[SetFormat]:
    """The formats registered for ``task``, in registration order."""
    _check_task(task)
    return [fmt for (_, fmt_task), fmt in SET_FORMATS.items() if fmt_task == task]


def get_set_format(name: str, task: str) -> SetFormat:
    """The ``task`` format registered as ``name``; ValueError naming the registered ones."""
    if (name, task) not in SET_FORMATS:
        names = ", ".join(fmt.name for fmt in set_formats(task))
        raise ValueError(f"unknown {task} set format {name!r}; expected one of {names}")
    return SET_FORMATS[(name, task)]


def find_set_format(path: str | os.PathLike, task: str) -> SetFormat:
    """The one ``task`` format that claims ``path``.

    Raises:
        FileNotFoundError: no format claims ``path`` and nothing is there.
        ValueError: no format claims ``path`` (listing the formats and what each expects), or
            several do (naming them).
    """
    path = Path(path)
    formats = set_formats(task)
    claimed = [fmt for fmt in formats if fmt.claims(path)]
    if len(claimed) > 1:
        names = " and ".join(fmt.name for fmt in claimed)
        raise ValueError(
            f"evaluation set {path} is claimed by the {task} set formats {names}; name the "
            "format explicitly or make their claims exclusive"
        )
    if claimed:
        return claimed[0]
    if not path.exists():
        raise FileNotFoundError(f"evaluation set directory not found: {path}")
    listing = "; ".join(f"{fmt.name}: {fmt.expects}" for fmt in formats)
    raise ValueError(f"no {task} set format reads {path}; expected one of: {listing}")


def resolve_set_format(
    path: str | os.PathLike, task: str, format_name: str | None = None
) -> SetFormat:
    """The ``task`` format registered as ``format_name`` when given, else the one that claims
    ``path`` (:func:`get_set_format` / :func:`find_set_format`)."""
    return get_set_format(format_name, task) if format_name else find_set_format(path, task)


def set_options(fmt: SetFormat, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` that are set (not None), refused when ``fmt`` does not take one."""
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(fmt.options))
    if unknown:
        takes = ", ".join(fmt.options) or "no options"
        raise ValueError(
            f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to a "
            f"{fmt.name} set ({fmt.expects}); it takes {takes}"
        )
    return given


def prepare_set(
    path: str | os.PathLike, task: str, format_name: str | None = None, **options: Any
) -> Callable[[Callable], Any]:
    """Check the set at ``path`` now (before the model loads) and return ``transform -> what the
    evaluators take``. Its format is ``format_name`` when given, else the one claiming ``path``;
    ``options`` set to None are left to the format's defaults."""
    fmt = resolve_set_format(path, task, format_name)
    given = set_options(fmt, options)
    fmt.check(path, **given)
    return lambda transform: fmt.load(path, transform, **given)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"set format task must be one of {', '.join(TASKS)} (got {task!r})")
