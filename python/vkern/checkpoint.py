"""safetensors checkpoints, read and written one tensor at a time (for ``vkern merge``).

Why not ``safetensors.safe_open``: it memory-maps each file, and every page a merge
touches then counts in the process's resident set until the mapping goes away, so
a streamed merge of four 2 GB checkpoints shows ~8 GB RSS although it never holds
more than a few tensors. Here each tensor is read with ``os.preadv`` into a buffer
that is dropped after use (the bytes still go through the OS page cache, which is
not this process's memory). The format is the documented one: an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}`` (padded with spaces to a multiple of 8), then the data.
Files written here are read back by ``safetensors`` itself in the tests.

A checkpoint is a directory (``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or every ``*.safetensors`` in it) or one file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "U16": np.uint16,
          "U32": np.uint32, "U64": np.uint64}
ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NUMPY.items()}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}   # recipe dtype -> safetensors dtype


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as safetensors (names the file and the problem)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str                 # safetensors dtype string, e.g. "BF16"
    shape: Tuple[int, ...]
    offset: int                # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """(tensors by name, __metadata__) of one .safetensors file; validates the offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    out: Dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {h!r}") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if e - b != numel * ITEMSIZE[dtype] or b < 0 or data_start + e > size:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[b, e]} do not fit shape {list(shape)} "
                                  f"{dtype} inside the file")
        out[name] = TensorInfo(name, path, dtype, shape, data_start + b, e - b)
    return out, {str(k): str(v) for k, v in meta.items()}


class Checkpoint:
    """The tensors of a safetensors checkpoint (directory or file), by name; reads one at a time."""

    def __init__(self, path: str, what: str = "checkpoint"):
        self.path = str(path)
        self.what = what
        if os.path.isdir(self.path):
            index = os.path.join(self.path, INDEX_NAME)
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{what} {self.path}: cannot read {INDEX_NAME} ({exc})") from None
                files = sorted(set(weight_map.values()))
            else:
                files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
                weight_map = None
            if not files:
                raise CheckpointError(f"{what} {self.path}: no .safetensors files in this directory")
            files = [os.path.join(self.path, f) for f in files]
            self.dir = self.path
        elif os.path.isfile(self.path):
            files, weight_map = [self.path], None
            self.dir = os.path.dirname(self.path)
        else:
            raise CheckpointError(f"{what} {self.path}: no such file or directory")
        self.files = files
        self.tensors: Dict[str, TensorInfo] = {}
        self.metadata: Dict[str, str] = {}
        for fpath in files:
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{what} {self.path}: shard {os.path.basename(fpath)} listed in "
                                      f"{INDEX_NAME} does not exist")
            infos, meta = read_header(fpath)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"{what} {self.path}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{what} {self.path}: {INDEX_NAME} lists {name!r} in {fname}, "
                                          "which does not hold it")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a fresh uint8 array (one read, no mapping)."""
        return read_bytes(self.tensors[name])

    def read(self, name: str) -> np.ndarray:
        """The tensor in its own dtype as NumPy (bfloat16 comes back as uint16 bit patterns)."""
        info = self.tensors[name]
        return self.read_raw(name).view(_NUMPY[info.dtype]).reshape(info.shape)

    def read_f32(self, name: str) -> np.ndarray:
        """A float tensor decoded to float32 (F32 read straight into its buffer)."""
        info = self.tensors[name]
        return decode_f32(self.read_raw(name), info.dtype).reshape(info.shape)

    def fingerprint(self) -> str:
        return fingerprint(self.tensors.values())


def read_bytes(info: TensorInfo, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Bytes [start, stop) of the tensor's data (all of it by default) as a fresh uint8 array."""
    stop = info.nbytes if stop is None else stop
    n = stop - start
    buf = np.empty(n, dtype=np.uint8)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        view = memoryview(buf)
        while done < n:
            got = os.preadv(fd, [view[done:done + (1 << 30)]], info.offset + start + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor {info.name!r}: unexpected end of file")
            done += got
    finally:
        os.close(fd)
    return buf


def read_f32_range(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a float tensor (flat order) as a fresh float32 array."""
    size = ITEMSIZE[info.dtype]
    return decode_f32(read_bytes(info, start * size, stop * size), info.dtype)


def decode_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 bytes of a float tensor -> float32 (flat). BF16 widens exactly (bits << 16)."""
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise CheckpointError(f"decode: {dtype} is not a float dtype vkern merges (F32, F16, BF16)")


def encode_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> uint8 bytes of `dtype`; BF16 rounds to nearest even (NaN stays NaN), as torch does."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if dtype == "F32":
        return x.view(np.uint8)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint8)
    if dtype == "BF16":
        u = x.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
        return r.view(np.uint8)
    raise CheckpointError(f"encode: {dtype} is not a float dtype vkern writes (F32, F16, BF16)")


def fingerprint(infos: Iterable[TensorInfo], samples: int = 4, sample_bytes: int = 4096) -> str:
    """``vkern.ckpt-fingerprint/1``: SHA-256 over every tensor's name, dtype and shape and
    `samples` evenly spaced `sample_bytes`-byte slices of its data (all of it when smaller).
    Fine-tunes of one architecture share names and shapes, but differ in (nearly) every
    sampled slice; reading ~16 KiB per tensor keeps checking a base cheap."""
    h = hashlib.sha256(b"vkern.ckpt-fingerprint/1\0")
    for info in sorted(infos, key=lambda t: t.name):
        h.update(json.dumps([info.name, info.dtype, list(info.shape)]).encode())
        with open(info.file, "rb") as f:
            if info.nbytes <= samples * sample_bytes:
                f.seek(info.offset)
                h.update(f.read(info.nbytes))
            else:
                for i in range(samples):
                    start = (info.nbytes - sample_bytes) * i // (samples - 1)
                    f.seek(info.offset + start)
                    h.update(f.read(sample_bytes))
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------ writing

@dataclass
class _Planned:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    shard: int = 0
    begin: int = 0


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = [("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
             ("B", 1)]
    for u, mult in units:
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"max_shard_size: expected a size like '5GB' or '500MB', got {text!r}") from None
    if value <= 0:
        raise ValueError(f"max_shard_size: expected a positive size, got {text!r}")
    return int(value * mult)


class ShardedWriter:
    """Writes tensors, in the planned order, into shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own). Headers are written first
    (all shapes are known up front), so each tensor goes to disk as soon as it exists.

    One shard: ``model.safetensors``. Several: ``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as
    transformers writes them.
    """

    def __init__(self, outdir: str, plan: Sequence[Tuple[str, str, Tuple[int, ...]]], max_shard_bytes: int,
                 metadata: Optional[Dict[str, str]] = None, single_name: str = "model.safetensors"):
        self.outdir = outdir
        self.items: List[_Planned] = []
        shard, used = 0, 0
        for name, dtype, shape in plan:
            n = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype] if shape else ITEMSIZE[dtype]
            if used and used + n > max_shard_bytes:
                shard, used = shard + 1, 0
            self.items.append(_Planned(name, dtype, tuple(int(s) for s in shape), n, shard, used))
            used += n
        self.n_shards = shard + 1 if self.items else 1
        if self.n_shards == 1:
            self.names = [single_name]
        else:
            self.names = [f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors" for i in range(self.n_shards)]
        self.metadata = dict(metadata or {"format": "pt"})
        self._by_name = {it.name: it for it in self.items}
        self._next = 0
        self._part = 0
        self._files = []
        self._shard_open = -1

    @property
    def total_bytes(self) -> int:
        return sum(it.nbytes for it in self.items)

    def _open_shard(self, i: int) -> None:
        if self._files:
            self._files[-1].close()
        items = [it for it in self.items if it.shard == i]
        header = {it.name: {"dtype": it.dtype, "shape": list(it.shape),
                            "data_offsets": [it.begin, it.begin + it.nbytes]} for it in items}
        header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f = open(os.path.join(self.outdir, self.names[i]), "wb")
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        self._files.append(f)
        self._shard_open = i

    def write(self, name: str, data: np.ndarray) -> None:
        """Writes the next planned tensor's bytes (uint8, or any array whose bytes are it)."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        it = self._current(name)
        if raw.nbytes != it.nbytes - self._part:
            raise RuntimeError(f"ShardedWriter: tensor {name!r}: {raw.nbytes} bytes, planned {it.nbytes}")
        self.write_part(name, raw)

    def write_part(self, name: str, data: np.ndarray) -> None:
        """Writes the next bytes of the next planned tensor (in order; the tensor is done when all
        its planned bytes are written)."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        it = self._current(name)
        if self._part + raw.nbytes > it.nbytes:
            raise RuntimeError(f"ShardedWriter: tensor {name!r}: more than the planned {it.nbytes} bytes")
        if it.shard != self._shard_open:
            self._open_shard(it.shard)
        self._files[-1].write(memoryview(raw))
        self._part += raw.nbytes
        if self._part == it.nbytes:
            self._next += 1
            self._part = 0

    def _current(self, name: str) -> "_Planned":
        if self._next >= len(self.items) or self.items[self._next].name != name:
            want = self.items[self._next].name if self._next < len(self.items) else None
            raise RuntimeError(f"ShardedWriter: expected tensor {want!r} next, got {name!r}")
        return self.items[self._next]

    def close(self) -> None:
        if self._next != len(self.items):
            raise RuntimeError(f"ShardedWriter: {len(self.items) - self._next} planned tensors were not written")
        if not self._files:
            self._open_shard(0)
        self._files[-1].close()
        if self.n_shards > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {it.name: self.names[it.shard] for it in self.items}}
            with open(os.path.join(self.outdir, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)

    def abort(self) -> None:
        for f in self._files:
            f.close()
        for n in self.names + [INDEX_NAME]:
            p = os.path.join(self.outdir, n)
            if os.path.exists(p):
                os.remove(p)


@contextlib.contextmanager
def writing(writer: "ShardedWriter", total_bytes: int, desc: str, progress: bool = True):
    """The write loop's frame, shared by ``vkern merge`` and ``vkern taskvec compress``: yields
    ``tick(nbytes)`` for a bytes/s progress bar (tqdm, when installed and `progress`); closes the
    writer when the block ends, aborts it (partial files removed) on any exception, closes the bar."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                       dynamic_ncols=True)
        except ImportError:
            bar = None

    def tick(nbytes: int) -> None:
        if bar is not None:
            bar.update(nbytes)

    try:
        yield tick
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def save_file(tensors: Dict[str, np.ndarray], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """A small single-file writer (NumPy arrays; float32/float16/uint8/int... dtypes)."""
    rev = {np.dtype(v): k for k, v in _NUMPY.items() if k != "BF16"}
    plan, arrays = [], []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in rev:
            raise TypeError(f"save_file: tensor {name!r}: unsupported dtype {a.dtype}")
        plan.append((name, rev[a.dtype], a.shape))
        arrays.append(a)
    outdir, base = os.path.split(os.path.abspath(path))
    w = ShardedWriter(outdir, plan, 1 << 62, metadata=metadata or {}, single_name=base)
    for (name, _, _), a in zip(plan, arrays):
        w.write(name, a)
    w.close()
