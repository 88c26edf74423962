"""What a model path names, decided in one place for every reader (evaluation, export, init_from,
``python -m aclip.interop``).

A path is one of

- ``aclip_run``: our run (a run directory, its ``checkpoints/``, a step directory, or the
  model-states file; :mod:`aclip.interop.run` reads it);
- ``open_clip_dir``: an open_clip folder (``open_clip_config.json`` + weights), our export among
  them, named as a folder or ``local-dir:DIR``;
- ``open_clip_file``: a weights file given with its open_clip model name (or config);
- ``openai_file``: a weights file without one, read as an OpenAI release (TorchScript archive or
  plain state dict);
- ``timm_dir``: a timm folder as ``python -m aclip.export --format timm`` writes it (``config.json``
  + weights): an image tower alone, refused with how to load it with timm;
- ``folder``: any other folder, refused.

An ``hf-hub:org/name`` name is resolved from the local Hugging Face cache only (as open_clip's
``hf-hub:`` names are, with ``local_files_only``); nothing is downloaded. The snapshot folder it
names is then classified as a folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from aclip.interop.run import MODEL_STATES
from aclip.interop.weights import LOCAL_DIR, OPEN_CLIP_CONFIG, WeightsError

HF_HUB = "hf-hub:"
ACLIP_RUN = "aclip_run"
OPEN_CLIP_DIR = "open_clip_dir"
OPEN_CLIP_FILE = "open_clip_file"
OPENAI_FILE = "openai_file"
TIMM_DIR = "timm_dir"
FOLDER = "folder"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's save_for_hf writes one


@dataclass(frozen=True)
class Source:
    """A model path, classified: its kind (see the module docstring), the file or folder that
    holds it (``local-dir:`` stripped, an ``hf-hub:`` name resolved) and the path as given."""

    kind: str
    path: Path
    given: str

    def refusal(self) -> str | None:
        """Why this source holds no CLIP aclip reads (a timm folder, another folder), or None."""
        if self.kind == TIMM_DIR:
            return (
                f"{self.given}: a timm model folder ({TIMM_CONFIG} + weights, as "
                "`python -m aclip.export --format timm` writes it) holds an image tower alone, "
                "not a CLIP; load it with timm: "
                f'timm.create_model("local-dir:{self.path}", pretrained=True)'
            )
        if self.kind == FOLDER:
            return f"{self.given}: a folder that is neither an aclip run nor an open_clip folder"
        return None


def is_aclip_run(path: str | Path) -> bool:
    """Whether ``path`` is our run: the model-states file, or a folder (run, checkpoints or step
    directory) holding it or DeepSpeed's ``latest`` pointer, itself or in ``checkpoints/``."""
    path = Path(path)
    if path.is_file():
        return path.name == MODEL_STATES
    return any((d / "latest").is_file() or (d / MODEL_STATES).is_file()
               for d in (path, path / "checkpoints"))  # fmt: skip


def is_timm_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a timm model (``config.json`` naming its ``architecture``, and
    weights) and no open_clip config."""
    config = folder / TIMM_CONFIG
    if (folder / OPEN_CLIP_CONFIG).is_file() or not config.is_file():
        return False
    if not any((folder / name).is_file() for name in TIMM_WEIGHTS):
        return False
    try:
        return "architecture" in json.loads(config.read_text())
    except (ValueError, OSError):
        return False


def hf_hub_folder(name: str) -> Path:
    """The local snapshot folder of ``hf-hub:org/name`` in the Hugging Face cache
    (``HF_HUB_CACHE``, else huggingface_hub's default); WeightsError when it is not cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = name.removeprefix(HF_HUB)
    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as err:
        raise WeightsError(
            f"{name}: not in the local Hugging Face cache ({cache_dir}); nothing is downloaded at "
            f"run time: fetch it beforehand (huggingface-cli download {repo_id}) or give its "
            f"folder ({type(err).__name__})"
        ) from None


def classify(path: str | Path, model_name: str | Path | None = None) -> Source:
    """What ``path`` names (see the module docstring). Nothing is read but folder listings and,
    for a timm folder, its ``config.json``; a path that does not exist is classified by its
    shape (a weights file), and reading it says so."""
    given = str(path)
    if given.startswith(HF_HUB):
        folder = hf_hub_folder(given)
        kind = _folder_kind(folder)
        if kind not in (OPEN_CLIP_DIR, TIMM_DIR):
            raise WeightsError(f"{given}: its snapshot {folder} holds no {OPEN_CLIP_CONFIG}")
        return Source(kind, folder, given)
    folder = Path(given.removeprefix(LOCAL_DIR))
    if given.startswith(LOCAL_DIR) and not is_timm_folder(folder):
        return Source(OPEN_CLIP_DIR, folder, given)
    if folder.is_dir():
        return Source(_folder_kind(folder), folder, given)
    if is_aclip_run(folder):
        return Source(ACLIP_RUN, folder, given)
    return Source(OPENAI_FILE if model_name is None else OPEN_CLIP_FILE, folder, given)


def _folder_kind(folder: Path) -> str:
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return OPEN_CLIP_DIR
    if is_aclip_run(folder):
        return ACLIP_RUN
    return TIMM_DIR if is_timm_folder(folder) else FOLDER
