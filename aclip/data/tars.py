"""Tar shards -> webdataset samples, with a bound on the size of each member read.

webdataset's ``tarfile_to_samples`` opens every shard with ``tarfile.open(mode="r|*")``
(webdataset/tariterators.py, ``tar_file_iterator``), which decompresses gzip, bz2 and xz
streams whatever the shard's name, and reads each member whole into memory: a 300 KB gzip
named ``.tar`` can hold a 300 MB member of zeros. This stage is webdataset's, with the
member's size (from its tar header) checked before it is read; a member over the bound ends
its shard as one ``bad_tar`` (a compressed stream could go on expanding for a long time).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, url_opener

from aclip.data.decode import MAX_DECODE_PIXELS
from aclip.data.skips import BadSample

# 4 bytes per pixel of the largest image decoded in full (128 MiB): no image, caption or
# region file of a training or evaluation sample needs more
MAX_MEMBER_BYTES = 4 * MAX_DECODE_PIXELS
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: files like __key__


def _skipped(name: str) -> bool:
    """webdataset's rule for tar members that are not sample files (metadata)."""
    return bool(_META.match(name)) or (
        "/" not in name and name.startswith("__") and name.endswith("__")
    )


def _too_large(info: tarfile.TarInfo, stream: tarfile.TarFile, url: str, bound: int) -> BadSample:
    comptype = getattr(stream.fileobj, "comptype", "tar")
    packed = f" (a {comptype}-compressed stream)" if comptype != "tar" else ""
    return BadSample(
        "bad_tar",
        f"shard {url}{packed}: member {info.name} holds {info.size} bytes, more than the "
        f"{bound} allowed per member; the rest of the shard is skipped",
        url,
    )


def _members(
    fileobj: Any, url: str, bound: int, handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_iterator`` (same members, same error handling), refusing a
    member of more than ``bound`` bytes before reading it."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
        for info in stream:
            if not info.isreg() or info.name is None or _skipped(info.name):
                continue
            if info.size > bound:
                raise _too_large(info, stream, url, bound)
            try:
                data = stream.extractfile(info).read()
            except Exception as exn:
                if exn.args:
                    exn.args = (f"{exn.args[0]} @ {fileobj}", *exn.args[1:])
                if handler(exn):
                    continue
                break
            yield {"fname": info.name, "data": data}
            stream.members = []


def _expand(
    sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool], bound: int
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander`` over `_members`: one end-of-shard ``{}`` per shard,
    errors passed to ``handler`` with the shard's url as their last argument."""
    for source in sources:
        url = source["url"]
        try:
            for sample in _members(source["stream"], url, bound, handler):
                sample["__url__"] = url
                yield sample
            yield {}
        except Exception as exn:
            if not isinstance(exn, BadSample):
                exn.args = (*exn.args, source.get("stream"), url)
            if handler(exn):
                continue
            break


def bounded_tar_samples(
    src: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool] = reraise_exception,
    max_member_bytes: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Shard urls (webdataset's ``{"url": ...}`` dicts) -> samples, as
    ``wds.tarfile_samples``, but a member of more than ``max_member_bytes`` (default
    MAX_MEMBER_BYTES, read at call time; the size read from its tar header) is never read:
    it raises ``BadSample("bad_tar")`` naming the shard, the member and its size, given to
    ``handler`` (which counts it, or re-raises it)."""
    streams = url_opener(src, handler=handler)
    bound = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    return group_by_keys(_expand(streams, handler, bound), handler=handler)


tarfile_to_samples = wds.pipelinefilter(bounded_tar_samples)
