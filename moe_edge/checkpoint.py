"""Safetensors checkpoints: lazy reads by tensor name, and sharded writes that land atomically.

Only safetensors is ever read: pickle files (`*.bin`, `*.pt`) can run code when loaded, so a
folder that has only those is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import read_json_object
from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST = "writer_manifest.json"  # only in a resumable writer's work folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map {tensor name: shard file name}, checked for its types."""
    weight_map = read_json_object(index, "a safetensors index", CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard "
                              "file name; restore the index from the original checkpoint")
    return weight_map


class CheckpointReader:
    """Tensors of a single-file or sharded safetensors checkpoint, read one at a time.

    >>> reader = CheckpointReader("deepseek-moe-16b-chat")
    >>> w = reader.get("model.layers.1.mlp.gate.weight")   # reads only that tensor
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such model folder")
        self._handles: dict[Path, object] = {}
        self._file_of = self._locate_tensors()

    def _locate_tensors(self) -> dict[str, Path]:
        """transformers' resolution: the index, else model.safetensors, else the one
        *.safetensors file; a tensor name in two of the files read is refused."""
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.exists():
            return self._read_index(index, single)
        if single.exists():
            return self._names_in([single])
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(self._no_safetensors_message())
        if len(files) > 1:
            raise CheckpointError(f"{self.folder}: {len(files)} *.safetensors files ({files[0].name}, "
                                  f"{files[1].name}, ...) but no {INDEX_FILE} or {SINGLE_FILE}; add "
                                  "the index that says which file holds each tensor, or keep one file")
        return self._names_in(files)

    def _names_in(self, files: list[Path]) -> dict[str, Path]:
        located: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                if name in located:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in both "
                                          f"{located[name].name} and {f.name}; a tensor must have "
                                          "one source - remove the stale file")
                located[name] = f
        return located

    def _read_index(self, index: Path, single: Path) -> dict[str, Path]:
        weight_map = read_weight_map(index)
        shards = {shard: self._shard_path(index, shard) for shard in set(weight_map.values())}
        if single.exists() and SINGLE_FILE not in shards:
            raise CheckpointError(f"{self.folder}: both {INDEX_FILE} and {SINGLE_FILE}, which the "
                                  "index does not list; transformers would read the single file, "
                                  "moe-edge the index - remove the stale one")
        in_shards = self._names_in(sorted(shards.values()))
        for name, shard in weight_map.items():
            if in_shards.get(name) != shards[shard]:
                raise CheckpointError(f"{index}: weight_map puts tensor {name!r} in {shard}, which "
                                      "has no such tensor; the index and shards disagree - "
                                      "download the checkpoint again")
        self.release()  # headers checked; shards reopen on the first read
        return {name: shards[shard] for name, shard in weight_map.items()}

    def _shard_path(self, index: Path, shard: str) -> Path:
        """A shard named by the index: a plain file name beside it, nothing else (no ../, no
        absolute path). The file itself may be a symlink, as in the Hugging Face cache."""
        if Path(shard).name != shard or shard in (".", "..") or "\0" in shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the model folder; "
                                  "an index may only name files beside it")
        path = self.folder / shard
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing; "
                                  "download the complete checkpoint")
        return path

    def _no_safetensors_message(self) -> str:
        pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            return (f"{self.folder}: only pickle weights ({', '.join(sorted(pickles)[:3])}); "
                    "moe-edge never loads pickles because they can execute code. Convert them "
                    "to safetensors (e.g. load in transformers and save_pretrained(..., "
                    "safe_serialization=True)) and try again")
        return f"{self.folder}: no *.safetensors weight files found"

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e}); the file is "
                                      "probably truncated or corrupt - download it again") from None
            self._handles[path] = handle
        return handle

    def release(self) -> None:
        """Close the shard files. Reads go through memory maps, whose touched pages count as
        this process's resident memory until unmapped: streaming readers call this after
        each layer so that resident memory tracks one layer, not the file. Files reopen on
        the next read."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self._file_of)

    def files(self) -> list[Path]:
        """The weight files this checkpoint is read from (what a fingerprint must cover)."""
        return sorted(set(self._file_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        if name not in self._file_of:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of(name)).get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "F32", "I32", ...), from the header."""
        return self._open(self.file_of(name)).get_slice(name).get_dtype()

    def itemsize(self, name: str) -> int:
        """Bytes per element as stored (without reading the tensor)."""
        dtype = self.stored_dtype(name)
        return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def get_expert(self, name: str, index: int) -> torch.Tensor:
        """`tensor[index]` of a stacked [E, ...] tensor, reading only that slice."""
        return self._read(name, index)

    def _read(self, name: str, index: int | None) -> torch.Tensor:
        path = self.file_of(name)
        try:
            handle = self._open(path)
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); the file is "
                                  "probably truncated or corrupt - download it again") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def stat_signature(files: Iterable[Path]) -> str:
    """Name, size and mtime of each file: what fingerprints of a checkpoint's files hash."""
    return "".join(f"|{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def partial_folder(out: str | Path) -> Path:
    """Where a resumable writer for `out` keeps its work: `.OUT.partial` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def refuse_overlap(source: str | Path, out: str | Path) -> None:
    """An output folder that is, contains or lies inside `source` (symlinks resolved) is
    refused: replacing it, or writing beside it, would touch the source's own files."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src:
        how = "is the source folder"
    elif dst in src.parents:
        how = "contains the source folder"
    elif src in dst.parents:
        how = "lies inside the source folder"
    else:
        return
    raise CheckpointError(f"{out}: the output {how} {source}; choose an output folder outside it "
                          "(the source is never written to)")


class ShardedWriter:
    """Writes tensors into size-capped safetensors shards plus an index, atomically.

    Everything goes to a temporary folder beside `out`; only `commit()` moves it into place,
    so an interrupted run never leaves a folder that looks complete.

    >>> with ShardedWriter("out", max_shard_bytes=2**30) as w:
    ...     w.add("model.embed_tokens.weight", emb)
    ...     w.write_json("config.json", cfg)
    ...     w.commit()

    With `resumable=True` the work folder has a fixed name (`.OUT.partial` beside OUT) and
    survives a failure; `checkpoint(state)` records finished shards plus caller state, and a
    new writer on the same OUT picks them up (`resumed_state`).
    """

    def __init__(self, out: str | Path, max_shard_bytes: int = 4 * 2**30, overwrite: bool = False,
                 resumable: bool = False):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"{self.out}: is a file, not a folder; choose another output path")
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out}: already exists; choose another output folder "
                                  "or pass overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._mode = 0o777 & ~_umask()
        self.resumable = resumable
        if resumable:
            self.tmp = partial_folder(self.out)
            self.tmp.mkdir(exist_ok=True)
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        os.chmod(self.tmp, self._mode)  # mkdtemp makes it private; the output is a normal folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._total_bytes = 0
        self.committed = False
        self.resumed_state = self._load_manifest() if resumable else None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and not self.resumable:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        """Delete the work folder (a resumable writer keeps it otherwise)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _load_manifest(self) -> dict | None:
        manifest = self.tmp / MANIFEST
        if not manifest.exists():
            return None
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            self._shards, self._total_bytes = data["shards"], data["total_bytes"]
            self._names = {n for names in self._shards for n in names}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}); the partial run "
                                  f"cannot be resumed - delete {self.tmp} and start again") from None
        for i in range(len(self._shards)):
            if not (self.tmp / f"shard-{i}.tmp").exists():
                raise CheckpointError(f"{self.tmp}: shard-{i}.tmp is missing; the partial run "
                                      "cannot be resumed - start again without resume")
        return data["state"]

    def checkpoint(self, state: dict) -> None:
        """Flush what is pending and record it with `state`, atomically."""
        if self._pending:
            self._flush()
        data = {"shards": self._shards, "total_bytes": self._total_bytes, "state": state}
        tmp = self.tmp / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.tmp / MANIFEST)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.add(name, t)

    def _flush(self) -> None:
        i = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{i}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, filename: str, obj: dict) -> None:
        (self.tmp / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")

    def copy_file(self, src: str | Path) -> None:
        shutil.copy2(src, self.tmp / Path(src).name)

    def commit(self) -> Path:
        """Name the shards, write the index, and move the folder into place."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            os.replace(self.tmp / f"shard-{i}.tmp", self.tmp / shard_name(i, n))
            os.chmod(self.tmp / shard_name(i, n), self._mode & 0o666)
            weight_map.update({name: shard_name(i, n) for name in names})
        (self.tmp / MANIFEST).unlink(missing_ok=True)
        if n > 1:
            self.write_json(INDEX_FILE, {"metadata": {"total_size": self._total_bytes},
                                         "weight_map": weight_map})
        self._replace_out()
        self.committed = True
        return self.out

    def _replace_out(self) -> None:
        old = None
        if self.out.exists():  # overwrite: move the old folder aside, so it is never half-replaced
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
