"""Files that may come from anyone: checkpoints read without running code, and digests of big files.

A .pt/.pth/.bin checkpoint is a pickle, and unpickling calls whatever function the file names
(`os.system` included), so a checkpoint from a download, a shared folder or a colleague could
run code the moment it is loaded. Every checkpoint the package reads therefore goes through
`load_torch_file` (torch's weights-only unpickler: tensors, containers and plain values, no
other globals) or safetensors. OpenAI's TorchScript archives go through `torchscript_tensors`,
which reads the archive's pickled attributes through an allow-list of the same kind and never
runs the archive's code: `torch.jit.load` would, since a TorchScript module may define
`__setstate__`. diffusers and transformers folders are loaded by those libraries, which read
pickled .bin weights with `weights_only=True` too.

`sha256_files` hashes the exports and engines whose digests a manifest or record keeps. A
multi-gigabyte engine takes seconds to hash, and a process that loads the same files again
(benchmarks, sweeps) would pay that each time, so big files are hashed once per process: a
later call compares the file's identity (device, inode, size, modification and change times)
with the one hashed and reuses the digest while it is unchanged. Small files are always hashed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# --- checkpoints ----------------------------------------------------------------------------

UNSAFE_PICKLE = ("it holds pickled objects other than tensors and plain values, which loading would run as "
                 "code, so it was not loaded")


def load_torch_file(path: str | Path) -> Any:
    """`torch.load` of `path` onto the CPU with the weights-only unpickler; its exceptions as they are
    (describe them with `why_unreadable`)."""
    import torch

    with warnings.catch_warnings():
        # The weights-only unpickler warns about pickle protocols above 2 (plain pickle.dump
        # writes 4) on stderr; the file still loads, or is refused with an exception.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def why_unreadable(err: BaseException) -> str:
    """What is wrong with a file `load_torch_file` or `torchscript_tensors` refused, in a few words
    (torch's own messages run to several sentences, and suggest turning the safety off)."""
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if isinstance(err, pickle.UnpicklingError):
        text = str(err).lower()
        if isinstance(err, UnsafePickle) or "global" in text:
            return UNSAFE_PICKLE
        # Other refusals of the weights-only unpickler: opcodes it does not take (plain
        # pickle.dump's protocol 4 framing, too) or bytes that are no pickle at all.
        return ("not a tensor checkpoint: the file is corrupt or holds pickled objects other than tensors "
                "and plain values; it was not loaded")
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    if "TorchScript archive" in line:
        return "it is a TorchScript archive, not a state dict"
    if "zip archive" in line or "central directory" in line or isinstance(err, zipfile.BadZipFile):
        return "the file is truncated or corrupt"
    return line.split(". ", 1)[0]


class UnsafePickle(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list."""


def is_torchscript(path: str | Path) -> bool:
    """The test torch.load itself uses: TorchScript archives are zips with a constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


class _ScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`): keeps the attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # a class with its own __getstate__: its state is not a mapping of names
            self.__dict__["__state__"] = state


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    import torch

    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def _same(value, *_):
    return value


# Everything a TorchScript module's data.pkl needs, mapped to functions that only build values.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _same,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, Any] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(getattr(torch, _STORAGE_DTYPES[name]))
        if module == "__torch__" or module.startswith("__torch__."):
            # One stand-in class per TorchScript class name; nothing of the archive's code is used.
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {})
            return self._classes[key]
        raise UnsafePickle(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickle(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if flat.numel() < int(numel):
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, not {numel}")
            self._storages[key] = flat
        return self._storages[key]


def torchscript_tensors(path: str | Path) -> dict[str, Any]:
    """The tensors of a TorchScript archive's module tree by dotted name, as `state_dict()` names
    them, read without loading TorchScript. UnsafePickle if its data names other globals."""
    import torch

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise pickle.UnpicklingError("the archive has no data.pkl")
        prefix = data_pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").decode().strip() != sys.byteorder:
            raise pickle.UnpicklingError("the archive was written on a machine of the other byte order")
        root = _ArchiveUnpickler(archive.read(data_pkl[0]), archive, prefix).load()

    found: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(obj: Any, at: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                found[at + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{at}{name}.")

    if not isinstance(root, _ScriptObject):
        raise pickle.UnpicklingError("the archive does not hold a module")
    walk(root, "")
    return found


# --- digests --------------------------------------------------------------------------------

# Below this a file is hashed on every call: it is quick, and a file rewritten in place within
# the file system's timestamp resolution keeps its identity.
REMEMBER_FROM_BYTES = 64 << 20
_digests: dict[tuple, str] = {}


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of one file's bytes, remembered for this process while the file is unchanged
    if it is big (see the module docstring)."""
    path = Path(path)
    ident = _identity(path)
    remembered = _digests.get(ident)
    if remembered is not None:
        return remembered
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()
    if ident[3] >= REMEMBER_FROM_BYTES and _identity(path) == ident:
        _digests[ident] = value
    return value


def sha256_files(paths: Iterable[str | Path]) -> str:
    """sha256 (hex) of the files' bytes one after the other, as if they were one file."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return file_sha256(paths[0])
    # Several files hash as their concatenation: the per-file digests cannot be combined, so
    # the whole is remembered under all their identities at once.
    ident = tuple(_identity(p) for p in paths)
    remembered = _digests.get(ident)
    if remembered is not None:
        return remembered
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    if sum(i[3] for i in ident) >= REMEMBER_FROM_BYTES and tuple(_identity(p) for p in paths) == ident:
        _digests[ident] = value
    return value
