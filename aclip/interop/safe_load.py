"""Reading checkpoint files without running code.

``torch.load`` unpickles, and a pickle can call any function (a planted
``mp_rank_00_model_states.pt`` could delete files or open a shell). Every file aclip reads (model
states, ZeRO optimizer states, per-rank resume states, bare weights files) goes through
:func:`load`: ``torch.load(weights_only=True)``, whose unpickler builds only tensors, containers,
numbers and strings, plus the few types aclip's own checkpoints hold (:func:`allowed_globals`:
DeepSpeed's loss scaler, ZeRO stage enum and fragment address in its optimizer states; for rank
files only, the numpy array types of the RNG state as written before it was saved as a tensor).
DeepSpeed's own reads (``engine.load_checkpoint``, ``zero_to_fp32``) call
``torch.load(weights_only=False)``; :func:`deepspeed_reads_safe` makes them go through
:func:`load` too.

A file that holds anything else is refused (:class:`UnsafeCheckpointError`, naming the types);
only under :func:`trusting` (``--trust-checkpoint``, ``train.trust_checkpoint=true``) is such a
file unpickled without restriction. A file that is no PyTorch checkpoint at all (an image, a
gzip, a plain pickle, ...) is named by its magic bytes (:func:`file_kind`) without unpickling it.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

_TORCH_LOAD = torch.load  # the real one, also while deepspeed_reads_safe has replaced it
# torch.save's legacy (non-zip) format begins with a pickle of this magic number (LONG1 opcode)
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
TRUST_HINT = (
    "if you trust this file (e.g. you wrote it yourself), pass --trust-checkpoint "
    "(train.py: train.trust_checkpoint=true) to read it anyway"
)
_trusted = False


class CheckpointError(ValueError):
    """A file that is not a PyTorch checkpoint aclip can read (says what the file is)."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch checkpoint that would build types outside the allow-list (could run code)."""


def deepspeed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's optimizer states hold (saved by ZeRO 1/2 and the
    bf16/fp16 optimizers; fp16 on a GPU keeps a DynamicLossScaler): plain data (numbers, a
    dtype), built without calling any of their methods."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_rng_globals() -> list[Any]:
    """The numpy types of ``np.random.get_state()``'s key array, as rank files written before
    the RNG state was stored as a tensor hold it (a uint32 array: no object is unpickled)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def allowed_globals() -> list[Any]:
    """The types :func:`load` lets any checkpoint build beyond torch's own allow-list (rank
    files add :func:`numpy_rng_globals` through ``extra_globals``)."""
    return deepspeed_globals()


def file_kind(path: str | Path) -> str | None:
    """What ``path`` is, from its first bytes, when it is not a PyTorch checkpoint (``None``
    when it is one: a zip archive holding ``data.pkl`` or torch's legacy format)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:24]:  # after PROTO (and FRAME) opcodes
        return None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[257:262] == b"ustar":
        return "a tar archive"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30:
        return "a safetensors file"
    if head[:1] == b"\x80" and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "a plain pickle file (not written by torch.save)"
    return _text_or_unknown(head)


_MAGIC = [
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"BZh", "a bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "an xz-compressed file"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"%PDF", "a PDF document"),
]


def _zip_kind(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "a damaged zip archive"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "a TorchScript archive (torch.jit.save, e.g. an OpenAI release), not a state dict"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    return f"a zip archive without data.pkl (holding e.g. {', '.join(names[:3]) or 'nothing'})"


def _text_or_unknown(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a file of unknown format (first bytes {head[:8].hex(' ')})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (beginning {first!r})"


def _source_name(f: str | Path | IO[bytes]) -> str:
    return str(f) if isinstance(f, str | Path) else str(getattr(f, "name", "<file object>"))


def _refused_globals(err: Exception) -> list[str]:
    """What torch's restricted unpickler refused to build (empty: it did not refuse anything,
    the file failed for another reason)."""
    text = str(err)
    if "Weights only load failed" not in text:
        return []
    names = re.findall(r"GLOBAL ([\w.]+)", text) + re.findall(r"but got <class '([\w.]+)'>", text)
    if names:
        return sorted(set(names))
    reason = text.split("\n\n", 1)[-1].split("Check the documentation")[0]
    reason = reason.replace("WeightsUnpickler error:", "").split("Please ")[0]
    return [f"something its restricted unpickler refuses ({' '.join(reason.split())[:200]})"]


def load(
    f: str | Path | IO[bytes], map_location: Any = "cpu", extra_globals: list[Any] = (), **kwargs
) -> Any:
    """``torch.load(f, weights_only=True)`` with :func:`allowed_globals` (and ``extra_globals``)
    allowed; never runs code from the file, unless under :func:`trusting`.

    Raises:
        CheckpointError: ``f`` is no PyTorch checkpoint (says what it is) or is damaged.
        UnsafeCheckpointError: ``f`` would build other types (names them).
    """
    name = _source_name(f)
    if isinstance(f, str | Path):
        kind = file_kind(f)
        if kind is not None:
            raise CheckpointError(f"{name} is {kind}, not a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals([*allowed_globals(), *extra_globals]):
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(err)
        if not refused:
            raise CheckpointError(f"{name} cannot be read: {_first_line(err)}") from None
        if _trusted:
            return _load_trusted(f, name, refused, map_location, **kwargs)
        raise UnsafeCheckpointError(
            f"{name} was refused: reading it would build {', '.join(refused)}, which is no "
            f"weight, counter or type aclip's checkpoints hold, and unpickling it could run code "
            f"(aclip reads checkpoint files without running any); {TRUST_HINT}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{name} cannot be read (damaged?): {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    """The first line of torch's message, without its advice to unpickle without restriction."""
    text = str(err).split("\n")[0].strip()
    return text.split(" Re-running `torch.load`")[0].split(" This file can still be loaded")[0]


def _load_trusted(
    f: str | Path | IO[bytes], name: str, refused: list[str], map_location: Any, **kwargs
) -> Any:
    print(f"warning: {name} holds {', '.join(refused)}; reading it with unrestricted unpickling "
          "because the checkpoint was declared trusted", file=sys.stderr, flush=True)  # fmt: skip
    if hasattr(f, "seek"):
        f.seek(0)
    return _TORCH_LOAD(f, map_location=map_location, weights_only=False, **kwargs)


@contextlib.contextmanager
def trusting(trust: bool = True) -> Iterator[None]:
    """Within the block, a checkpoint holding types outside the allow-list is unpickled without
    restriction (with a warning) instead of refused: for files the user declared trusted."""
    global _trusted
    before, _trusted = _trusted, bool(trust)
    try:
        yield
    finally:
        _trusted = before


def set_trusted(trust: bool) -> None:
    """Trust (or stop trusting) checkpoints for the rest of the process (command lines)."""
    global _trusted
    _trusted = bool(trust)


def _safe_torch_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` as DeepSpeed calls it, read through :func:`load` (its ``weights_only``
    argument ignored)."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    return load(f, map_location, **kwargs)


@contextlib.contextmanager
def deepspeed_reads_safe() -> Iterator[None]:
    """Within the block, ``torch.load`` is :func:`load`: DeepSpeed's checkpoint reads
    (``engine.load_checkpoint``'s checkpoint engine, ``zero_to_fp32``) pass
    ``weights_only=False`` and would otherwise unpickle the files without restriction."""
    torch.load = _safe_torch_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD  # type: ignore[assignment]


class _TrustAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, True)
        set_trusted(True)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint`` for a command line that reads checkpoints; the process trusts them
    only when it is given (building the parser resets the trust)."""
    set_trusted(False)
    parser.add_argument(
        "--trust-checkpoint",
        nargs=0,
        action=_TrustAction,
        default=False,
        help="read a checkpoint that holds types other than weights and aclip's/DeepSpeed's own "
        "(unpickling it can run code: only for files you trust)",
    )
