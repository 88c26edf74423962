"""The weights of a TorchScript archive (OpenAI's CLIP release files), read as data: nothing in
the archive is run.

``torch.jit.load`` compiles the archive's ``code/`` and runs the ``__setstate__`` methods it
defines while it unpickles the module, so a crafted ``.pt`` runs its own code on load (torch
refuses TorchScript under ``weights_only`` for this reason, CVE-2025-32434). This reader opens
the zip with :mod:`zipfile` and unpickles ``<archive>/data.pkl`` with an unpickler that knows
only the few names a module's tensors are rebuilt from (``torch._utils._rebuild_tensor_v2``,
``collections.OrderedDict``, the ``torch.*Storage`` types, torch's list tags) and turns every
``__torch__.*`` class into an inert :class:`ScriptObject` that records its state; any other name
is refused. A class that restores itself with code (a ``__setstate__``) is refused too: its
fields are whatever that code makes of its state, which only running it would tell.

The archive layout (torch/csrc/jit/serialization/export_module.cpp, import.cpp; facts only):
``<archive>/data.pkl`` is the module tree (protocol 2: ``GLOBAL __torch__.<qualname>``,
``NEWOBJ``, a dict of attributes, ``BUILD``), tensors are ``_rebuild_tensor_v2`` calls on
persistent ids ``('storage', torch.<Type>Storage, key, location, numel)`` whose bytes are the
record ``<archive>/data/<key>`` in the archive's ``byteorder`` (little when the record is absent,
as ``torch.serialization`` assumes). Which attributes are parameters and buffers is declared in
the class's printed source, ``<archive>/code/<qualname path>.py`` (``__parameters__ = [...]``,
``__buffers__ = [...]``), read here as text.
"""

from __future__ import annotations

import ast
import collections
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

# torch's storage type names (torch/storage.py _LegacyStorage subclasses) -> element dtype
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
MAX_PICKLE_BYTES = 256 << 20  # data.pkl holds the module tree, not the tensors: a few MB at most
_SCRIPT_PREFIX = "__torch__"
_CLASS_LINE = re.compile(r"class (\w+)(?:\((\w+)\))?:")
_LIST_LINE = re.compile(r"  (__parameters__|__buffers__) = (\[.*\])\s*")
_METHOD_LINE = re.compile(r"  def (\w+)\(\w+: (__torch__[\w.]*)")  # its self's class


class TorchScriptReadError(ValueError):
    """An archive this reader cannot (or will not) read: names the record, class or name."""


class ScriptObject:
    """An inert stand-in for an instance of one of the archive's ``__torch__`` classes: it keeps
    the state the pickle gives it (``BUILD``) and runs nothing."""

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any) -> ScriptObject:
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        """Takes (and ignores) whatever arguments the pickle calls the class with."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class ClassDecl:
    """What the archive's printed source declares of one class."""

    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    has_setstate: bool


@dataclass(frozen=True)
class _StorageType:
    """Stands for ``torch.<name>`` in a persistent id: only its element dtype is used."""

    name: str

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _Storage:
    """One storage record's elements, as a flat tensor."""

    flat: Tensor


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> Tensor:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks
    [, metadata])`` as a checked strided view of the storage (requires_grad, hooks and metadata
    do not belong in a state dict and are dropped, as ``Module.state_dict`` detaches)."""
    if not isinstance(storage, _Storage):
        raise TorchScriptReadError(f"a tensor whose storage is a {type(storage).__name__}")
    dims = (size, stride)
    if not all(isinstance(d, (tuple, list)) for d in dims) or len(size) != len(stride):
        raise TorchScriptReadError(f"a tensor with size {size!r} and stride {stride!r}")
    numbers = [offset, *size, *stride]
    if not all(type(n) is int and n >= 0 for n in numbers):
        raise TorchScriptReadError(f"a tensor with offset {offset!r}, size {size}, stride {stride}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.flat.numel():
            raise TorchScriptReadError(
                f"a tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) beyond "
                f"its storage of {storage.flat.numel()} elements"
            )
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


def _same(value: Any, *_tag: Any) -> Any:
    return value


# the only callables data.pkl may name (torch/jit/_pickle.py: the list tags return their data)
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _same,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
}


class _Unpickler(pickle.Unpickler):
    """data.pkl's unpickler: the allow-list above, inert ``__torch__`` stubs, storages from the
    archive's records."""

    def __init__(self, file: Any, read_storage: Callable[[str, torch.dtype, int], Tensor]):
        super().__init__(file)
        self._read_storage = read_storage
        self._classes: dict[str, type[ScriptObject]] = {}
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if module == _SCRIPT_PREFIX or module.startswith(_SCRIPT_PREFIX + "."):
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise TorchScriptReadError(f"it references {qualname}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptReadError(f"a persistent id {pid!r} that is not a storage")
        _, kind, key, _location, numel = pid  # every storage is read to the CPU
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise TorchScriptReadError(f"a malformed storage id {pid!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(key, kind.dtype, numel))
        storage = self._storages[key]
        if storage.flat.dtype != kind.dtype:
            raise TorchScriptReadError(f"storage {key} read as two dtypes")
        return storage


class _Archive:
    """A TorchScript zip: its records under the one top-level folder."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf, self.names = zf, set(zf.namelist())
        roots = {n.rsplit("/", 1)[0] for n in self.names if n.count("/") == 1}
        pickles = sorted(r for r in roots if f"{r}/data.pkl" in self.names)
        if len(pickles) != 1:
            found = "no <archive>/data.pkl" if not pickles else f"data.pkl in {pickles}"
            raise TorchScriptReadError(f"{found}: not a TorchScript archive this reader knows")
        self.root = pickles[0]
        self.swap = self._byteorder() != sys.byteorder

    def info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.zf.getinfo(f"{self.root}/{name}")
        except KeyError:
            raise TorchScriptReadError(f"the archive has no record {self.root}/{name}") from None

    def _byteorder(self) -> str:
        if f"{self.root}/byteorder" not in self.names:
            return "little"  # as torch.serialization assumes for records without the mark
        order = self.zf.read(f"{self.root}/byteorder").decode(errors="replace")
        if order not in ("little", "big"):
            raise TorchScriptReadError(f"{self.root}/byteorder is {order!r}, not little or big")
        return order

    def read_storage(self, key: str, dtype: torch.dtype, numel: int) -> Tensor:
        """``data/<key>``: ``numel`` elements of ``dtype``, byte-swapped to this machine's order."""
        info = self.info(f"data/{key}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size != numel * itemsize:
            raise TorchScriptReadError(
                f"{info.filename} holds {info.file_size} bytes; its storage is {numel} {dtype} "
                f"elements ({numel * itemsize} bytes)"
            )
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        buf = bytearray(info.file_size)  # one copy, aligned for any dtype (a fresh allocation)
        with self.zf.open(info) as fh:
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = fh.readinto(view[done:])
                if not n:
                    raise TorchScriptReadError(f"{info.filename} ends early")
                done += n
        flat = torch.frombuffer(buf, dtype=torch.uint8)
        word = itemsize // 2 if dtype.is_complex else itemsize  # a complex is two floats
        if self.swap and word > 1:
            flat = flat.view(-1, word).flip(-1).reshape(-1)
        return flat.view(dtype)

    def declarations(self) -> dict[str, ClassDecl]:
        """Every class the printed source under ``code/`` defines, by qualified name (the file
        ``code/a/b.py`` holds the classes ``a.b.<Name>``); read as text, never run."""
        classes: list[tuple[str, ClassDecl, set[str]]] = []
        prefix = f"{self.root}/code/"
        for name in sorted(self.names):
            if name.startswith(prefix) and name.endswith(".py"):
                module = name[len(prefix) : -len(".py")].replace("/", ".")
                text = self.zf.read(name).decode("utf-8", errors="replace")
                classes += _parse_classes(module, text)
        decls = {qualname: decl for qualname, decl, _ in classes}
        for _, decl, aliases in classes:  # as its methods name it, where the path does not
            for alias in aliases:
                decls.setdefault(alias, decl)
        return decls


def _parse_classes(module: str, text: str) -> list[tuple[str, ClassDecl, set[str]]]:
    """The classes of one printed source file as (qualified name, declaration, the names its
    methods' ``self`` is annotated with): ``class Name(Module):`` at column 0, its
    ``__parameters__`` / ``__buffers__`` list lines and whether it defines ``__setstate__``."""
    out: list[tuple[str, ClassDecl, set[str]]] = []
    current: dict[str, Any] | None = None
    aliases: set[str] = set()
    for line in [*text.splitlines(), "<end>"]:
        if line and not line[0].isspace():
            if current is not None:
                qualname = current.pop("qualname")
                out.append((qualname, ClassDecl(**current), aliases))
                current, aliases = None, set()
            match = _CLASS_LINE.fullmatch(line.rstrip())
            if match:
                current = {"qualname": f"{module}.{match[1]}", "is_module": match[2] == "Module",
                           "parameters": (), "buffers": (), "has_setstate": False}  # fmt: skip
        elif current is not None:
            listed = _LIST_LINE.fullmatch(line)
            method = _METHOD_LINE.match(line)
            if listed:
                names = ast.literal_eval(listed[2])  # a list of string literals
                current[listed[1].strip("_")] = tuple(str(n) for n in names)
            elif line.lstrip().startswith("def __setstate__("):
                current["has_setstate"] = True
            if method:
                aliases.add(method[2])
    return out


def _refuse_code_state(objects: list[ScriptObject], decls: dict[str, ClassDecl]) -> None:
    """Refuse any object whose class restores its state with its own code."""
    for obj in objects:
        decl = decls.get(obj.qualname)
        coded = decl is not None and decl.has_setstate
        if coded or not isinstance(obj.state, (dict, type(None))):
            raise TorchScriptReadError(
                f"its class {obj.qualname} restores its state with its own code (__setstate__), "
                "which torch.jit.load would run (OpenAI's releases have none)"
            )


def _collect(
    obj: ScriptObject, decls: dict[str, ClassDecl], prefix: str, out: dict[str, Tensor]
) -> None:
    """``obj``'s parameters, then buffers, then each submodule's, as ``Module.state_dict``
    orders them (a ``None`` parameter, e.g. a Linear without bias, is left out as there)."""
    decl = decls.get(obj.qualname)
    if decl is None:
        raise TorchScriptReadError(
            f"its class {obj.qualname} is not declared under code/ (cannot tell its parameters)"
        )
    state = obj.state or {}
    for name in (*decl.parameters, *decl.buffers):
        value = state.get(name)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TorchScriptReadError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
        out[prefix + name] = value
    for name, value in state.items():
        if not isinstance(value, ScriptObject):
            continue
        sub = decls.get(value.qualname)
        if sub is None or sub.is_module:  # an undeclared class is refused by the call
            _collect(value, decls, f"{prefix}{name}.", out)


def read_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The parameters and buffers of the TorchScript module saved at ``path``, with the keys and
    order ``torch.jit.load(path).state_dict()`` gives, on the CPU, without running anything
    from the archive (see the module docstring).

    Raises:
        TorchScriptReadError: "not a weights file we can read safely: ..." naming why: not a
            TorchScript archive or a damaged one; data.pkl names anything but tensors, the
            module tree and torch's list tags; a class restores itself with code
            (``__setstate__``); a storage record is missing or of the wrong size.
    """
    try:
        return _read(Path(path))
    except TorchScriptReadError as err:
        raise TorchScriptReadError(f"not a weights file we can read safely: {err}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, SyntaxError, RecursionError) as err:  # fmt: skip
        raise TorchScriptReadError(
            f"not a weights file we can read safely: a damaged TorchScript archive ({err!r})"
        ) from None


def _read(path: Path) -> dict[str, Tensor]:
    with zipfile.ZipFile(path) as zf:
        archive = _Archive(zf)
        info = archive.info("data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise TorchScriptReadError(f"{info.filename} is {info.file_size} bytes")
        with zf.open(info) as fh:
            root = _Unpickler(fh, archive.read_storage).load()
        decls = archive.declarations()
    if not isinstance(root, ScriptObject):
        raise TorchScriptReadError(f"data.pkl holds a {type(root).__name__}, not a module")
    _refuse_code_state(_reachable(root), decls)
    out: dict[str, Tensor] = {}
    _collect(root, decls, "", out)
    return out


def _reachable(root: ScriptObject) -> list[ScriptObject]:
    """Every ScriptObject reachable from ``root`` (through states, dicts, lists, tuples)."""
    seen: set[int] = set()
    found: list[ScriptObject] = []
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ScriptObject):
            found.append(item)
            stack.append(item.state)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return found
