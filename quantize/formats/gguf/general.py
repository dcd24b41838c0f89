"""The GGUFs' ``general.*`` keys (text and mmproj), derived from the model folder as llama.cpp's converter does.

``convert_hf_to_gguf.py`` fills them with ``gguf.Metadata``: the model card's front matter
(README.md: license, base model, tags, languages, ...), ``generation_config.json``'s sampling
defaults (``general.sampling.top_k`` / ``top_p`` / ``temp``, which llama.cpp's ``common`` uses in
place of its own defaults: Gemma 3n's top_k 64 instead of 40), and the folder's name (for
``gemma-3n-E4B-it``: basename ``gemma``, finetune ``3n-E4B-it``); the size label, where those give
none, from the tensors' element count.
We call the same code, so the keys are the converter's (tests/test_gguf_llamacpp.py), except the
name, which is the recipe's.

A model given as a hub id is read from the hub cache, whose folder is named by commit
(``models--google--gemma-3n-E4B-it/snapshots/<sha>``); the converter is run on a clone named
after the repository, so the name heuristics are given that name (through a link to the folder).
"""
from __future__ import annotations

import logging
import os
import tempfile
from math import prod
from pathlib import Path

import gguf
import yaml
from gguf import GGUFWriter

log = logging.getLogger(__name__)


def _repo_name(folder: Path) -> str | None:
    """``gemma-3n-E4B-it`` for a hub cache snapshot folder of ``google/gemma-3n-E4B-it``."""
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo.split("--", 2)[2]
    return None


def _metadata(folder: Path, name: str, total: int) -> gguf.Metadata:
    repo = _repo_name(folder)
    if repo is None:
        return gguf.Metadata.load(None, folder, name, total)
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / repo
        try:
            os.symlink(folder, link, target_is_directory=True)
        except OSError:  # no symlinks here (Windows without the privilege): the commit's name then
            return gguf.Metadata.load(None, folder, name, total)
        return gguf.Metadata.load(None, link, name, total)


def _dry_run(md: gguf.Metadata, arch: str) -> None:
    """Serialise the metadata's keys into a scratch file: a card value of a type the keys cannot
    hold (``license: 5``) fails only when the keys are packed, which for the real file is after
    its header is on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        trial = GGUFWriter(Path(tmp) / "general.gguf", arch)
        md.set_gguf_meta_model(trial)
        trial.write_header_to_file()
        trial.write_kv_data_to_file()
        trial.close()


def add_general(w: GGUFWriter, folder: str | Path, name: str, shapes, kind: str = gguf.GGUFType.MODEL) -> None:
    """``general.type`` (``kind``: model, or mmproj for the vision file, as the converter's
    ``MmprojModel`` does the same), the model card's and generation config's keys, the name and
    size label, and ``general.quantization_version``. ``shapes``: every tensor the file holds
    (``GGUFWriter.get_total_parameter_count`` counts the dead k/v placeholders at their full
    shapes too)."""
    total = sum(prod(s) for s in shapes)
    try:
        md = _metadata(Path(folder), name, total)
        _dry_run(md, w.arch)
    except (yaml.YAMLError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        # a model card whose front matter YAML cannot read, or whose values are not the types the
        # keys take (the converter stops there): keep the GGUF, lose the card's keys
        log.warning("%s: model card not read (%s: %s); the GGUF gets no license, tags or sampling defaults",
                    folder, type(e).__name__, e)
        md = gguf.Metadata(name=name)
    if md.size_label is None and total > 0:
        md.size_label = gguf.size_label(total, total, 0, 0)
    w.add_type(kind)
    md.set_gguf_meta_model(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
