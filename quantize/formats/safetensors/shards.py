"""Streaming safetensors shards: tensors go into a buffer that is flushed to its own file once it
reaches the size limit, so peak memory is about one shard, never the model.

Shards are written under temporary names inside the (temporary) artifact folder and renamed to
transformers' ``model-0000i-of-0000N.safetensors`` once N is known; one shard is called
``model.safetensors`` and needs no index.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantize.errors import ExportError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: the library serialises its maps in hash
    order, which differs between processes (seen: ``__metadata__`` keys reordered), and a rerun
    must give byte-identical files. Data offsets are relative to the data start, so only the
    header changes; it is padded with spaces to 8 bytes, as safetensors does."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        f.seek(0)
        f.write(struct.pack("<Q", len(text)) + text + data)
        f.truncate()


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str]):
        self.folder = folder
        self.max_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **metadata}
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ExportError(f"safetensors export: tensor {name!r} would be written twice")
        self.seen.add(name)
        n = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + n > self.max_bytes:
            self.flush()
        # contiguous copies: safetensors refuses views that share storage
        self.buffer[name] = tensor.detach().contiguous().clone()
        self.buffer_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f".shard-{len(self.parts):05d}.tmp"
        save_file(self.buffer, str(path), metadata=self.metadata)
        canonicalize_header(path)
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flush, give shards their final names and write the index when there are several."""
        self.flush()
        n = len(self.parts)
        if n == 0:
            raise ExportError("safetensors export: no tensors to write")
        if n == 1:
            final = self.folder / SINGLE
            self.parts[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (tmp, names) in enumerate(self.parts):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            files.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [self.folder / INDEX]
