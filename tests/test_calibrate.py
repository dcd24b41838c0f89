"""Calibration data: embedded default, local files, datasets folders, determinism, chat template.

References are independent of calibrate's own code paths: the tokenizer's own tokenization and
chat template, the image processor and feature extractor run on images and clips read with
other readers (scikit-image / PIL, soundfile + scipy).
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from scipy.signal import resample_poly

from calibrate import (
    CalibrationError,
    build_calibration,
    embedded_text,
    heldout_audio,
    heldout_images,
    heldout_manifest,
    heldout_text,
)
from calibrate.config import (
    AudioCalibration,
    CalibrationConfig,
    ImageCalibration,
    TextCalibration,
)
from calibrate.text import load_documents, sample_text

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "calibrate" / "data"


@pytest.fixture(scope="module")
def processor(tiny_random):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_random))


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def small(**kw) -> CalibrationConfig:
    """A cheap config: few text windows, no images or audio unless asked."""
    text = kw.pop("text", {})
    return CalibrationConfig(
        text=TextCalibration(**{"n_samples": 4, "seq_len": 64, **text}),
        images=ImageCalibration(**{"n_samples": 0, **kw.pop("images", {})}),
        audio=AudioCalibration(**{"n_samples": 0, **kw.pop("audio", {})}),
        **kw,
    )


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_spans_match(sample_ids, spans, doc_ids_by_name, sep):
    """The sample after <bos> is the concatenation of its spans of independently tokenized documents."""
    expected = []
    for i, (doc, first, count) in enumerate(spans):
        ids = doc_ids_by_name[doc] + sep
        expected.extend(ids[first : first + count])
    assert sample_ids[1:] == expected


# --------------------------------------------------------------------------- embedded default


def test_default_config_calibrates_all_three_towers(processor, tok):
    cs = build_calibration(CalibrationConfig(), processor, seed=0)
    m = cs.manifest
    json.dumps(m)  # JSON-serialisable
    assert m["counts"] == {"text": 32, "images": 4, "audio": 4, "multimodal": 0}
    assert all(t.shape == (1, 256) and t.dtype == torch.long and t[0, 0] == tok.bos_token_id for t in cs.text)

    # Text: calib split only, each sample = its recorded spans of the tokenizer's own ids.
    docs = {d.id: d.text for d in embedded_text.documents()}
    spans = [s for sample in m["text"]["samples"] for s in sample["spans"]]
    assert {embedded_text.split_of(doc) for doc, _, _ in spans} == {"calib"}
    ref = {doc: encode(tok, docs[doc]) for doc in {d for d, _, _ in spans}}
    for t, sample in zip(cs.text, m["text"]["samples"]):
        assert_spans_match(t[0].tolist(), sample["spans"], ref, [tok.eos_token_id])

    # Images: the image processor's own output on the same photographs read by scikit-image.
    import skimage.io

    skdir = __import__("pathlib").Path(__import__("skimage.data").data.__file__).parent
    names = [it["id"].removeprefix("skimage:") for it in m["images"]["items"]]
    assert len(set(names)) == 4
    photos = [Image.fromarray(skimage.io.imread(skdir / n)).convert("RGB") for n in names]
    expected = processor.image_processor(images=photos, return_tensors="pt")["pixel_values"]
    assert cs.images.shape == (4, 3, 768, 768)
    torch.testing.assert_close(cs.images, expected, rtol=0, atol=0)

    # Audio: the feature extractor's own output on the clip read with soundfile.
    fe = processor.feature_extractor
    for (feats, mask), item in zip(cs.audio, m["audio"]["items"]):
        wave, sr = sf.read(DATA / item["id"].removeprefix("embedded:"), dtype="float32")
        assert sr == 16000 and item["id"].startswith("embedded:speech_calib_")
        ref_f = fe(wave, return_tensors="pt")
        torch.testing.assert_close(feats, ref_f["input_features"], rtol=0, atol=0)
        assert torch.equal(mask, ref_f["input_features_mask"])


def test_same_seed_same_tokens_other_seed_other_tokens(processor):
    cfg = small(images={"n_samples": 2}, audio={"n_samples": 2})
    a, b, c = (build_calibration(cfg, processor, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.text, b.text))
    assert torch.equal(a.images, b.images)
    assert json.dumps(a.manifest, sort_keys=True) == json.dumps(b.manifest, sort_keys=True)
    assert [s["sha256"] for s in a.manifest["text"]["samples"]] != [s["sha256"] for s in c.manifest["text"]["samples"]]


def test_heldout_data_is_disjoint_from_calibration(processor, tok):
    cs = build_calibration(CalibrationConfig(text={"n_samples": 64}, images={"n_samples": 8}), processor, seed=3)
    held = heldout_manifest()
    used_docs = {d for s in cs.manifest["text"]["samples"] for d, _, _ in s["spans"]}
    assert used_docs and not used_docs & set(held["text"]["documents"])
    assert not {i["sha256"] for i in cs.manifest["images"]["items"]} & {i["sha256"] for i in held["images"]}
    assert not {i["sha256"] for i in cs.manifest["audio"]["items"]} & {i["sha256"] for i in held["audio"]}

    # Held-out windows: consecutive tokens of the eval documents, in id order, <bos> first.
    windows = heldout_text(tok, n_windows=3, seq_len=32)
    stream = []
    for d in embedded_text.split_documents("eval"):
        stream += encode(tok, d.text) + [tok.eos_token_id]
        if len(stream) > 200:
            break
    assert [w.shape for w in windows] == [(1, 32)] * 3
    assert [w[0, 1:].tolist() for w in windows] == [stream[k * 31 : (k + 1) * 31] for k in range(3)]
    assert len(heldout_images()) == 3 and all(im.mode == "RGB" for im in heldout_images())
    assert [sr for _, sr in heldout_audio()] == [16000, 16000]
    with pytest.raises(CalibrationError, match="held-out text.*too few tokens"):
        heldout_text(tok, n_windows=10_000, seq_len=256)


def test_embedded_eval_split_is_refused_for_calibration():
    with pytest.raises(ValueError, match="'eval' is held out"):
        TextCalibration(split="eval")


# --------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("packing", [False, True])
def test_chat_template_wrapping_matches_the_tokenizers_template(tok, packing):
    src = TextCalibration(n_samples=6, seq_len=96, chat_template=True, packing=packing)
    docs, _ = load_documents(src)
    texts = {d.id: d.text for d in docs}
    samples = sample_text(src, docs, tok, seed=5)
    prefix = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True)
    head, tail = prefix.split("X")
    head_ids, tail_ids = encode(tok, head), encode(tok, tail)
    assert head.startswith(tok.bos_token)
    for s in samples:
        ids = s.input_ids
        assert len(ids) <= 96 and ids[: len(head_ids)] == head_ids and ids[-len(tail_ids):] == tail_ids
        content = tok.decode(ids[len(head_ids) : -len(tail_ids)])
        # Independent reference: transformers renders and tokenizes the same user turn.
        ref = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        assert encode(tok, ref) == ids
        if not packing:
            assert content.strip() in texts[s.spans[0][0]]
    assert sum(len(s.input_ids) == 96 for s in samples) >= 5


# --------------------------------------------------------------------------- local files


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa".split()


def make_docs(n_docs, n_words, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n_words)) + f" doc{i}." for i in range(n_docs)]


def write_source(tmp_path, kind, docs, column="body"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "txt":
        folder = tmp_path / "txt"
        folder.mkdir()
        for i, d in enumerate(docs):
            (folder / f"doc{i:02d}.txt").write_text(d)
        return folder, {f"doc{i:02d}.txt": d for i, d in enumerate(docs)}
    path = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({column: d, "other": 1}) + "\n" for d in docs))
        return path, {f"corpus.jsonl:{i + 1}": d for i, d in enumerate(docs)}
    if kind == "parquet":
        pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path)
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["n", column])
            w.writerows([i, d] for i, d in enumerate(docs))
    return path, {f"corpus.{kind}:{i}": d for i, d in enumerate(docs)}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "csv"])
@pytest.mark.parametrize("packing", [False, True])
def test_local_text_files(tmp_path, processor, tok, kind, packing):
    docs = make_docs(8, 60, seed=len(kind))
    path, by_id = write_source(tmp_path, kind, docs)
    cfg = small(text={"source": "files", "path": str(path), "column": "body", "packing": packing, "n_samples": 3, "seq_len": 32})
    cs = build_calibration(cfg, processor, seed=1)
    ref = {i: encode(tok, d) for i, d in by_id.items()}
    for t, sample in zip(cs.text, cs.manifest["text"]["samples"]):
        assert t.shape == (1, 32)
        assert_spans_match(t[0].tolist(), sample["spans"], ref, [tok.eos_token_id] if packing else [])
    assert cs.manifest["text"]["source"] == "files" and cs.manifest["text"]["files"][0]["sha256"]


def test_text_glob_picks_matching_files(tmp_path, tok):
    path, by_id = write_source(tmp_path, "txt", make_docs(4, 80))
    src = TextCalibration(source="files", path=str(path / "doc0[0-1].txt"), n_samples=2, seq_len=32, packing=False)
    docs, manifest = load_documents(src)
    assert [d.id for d in docs] == ["doc00.txt", "doc01.txt"] and len(manifest["files"]) == 2


def test_hub_source_from_local_dataset_folders(tmp_path, processor, tok):
    import datasets

    docs = make_docs(6, 70, seed=3)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(saved))
    cfg = small(text={"source": "hub", "dataset": str(saved), "column": "content", "n_samples": 2, "seq_len": 32, "packing": False})
    cs = build_calibration(cfg, processor, seed=0)
    ref = {f"row:{i}": encode(tok, d) for i, d in enumerate(docs)}
    for t, sample in zip(cs.text, cs.manifest["text"]["samples"]):
        assert_spans_match(t[0].tolist(), sample["spans"], ref, [])
    assert cs.manifest["text"]["dataset"] == str(saved) and cs.manifest["text"]["fingerprint"]

    # A data folder that datasets.load_dataset reads (parquet builder), with a split slice.
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": docs}), folder / "train.parquet")
    src = TextCalibration(source="hub", dataset=str(folder), split="train[:4]", n_samples=2, seq_len=32)
    got, manifest = load_documents(src)
    assert [d.text for d in got] == docs[:4] and manifest["num_rows"] == 4
    # datasets' packaged parquet builder with explicit data_files (how one reads a c4 shard).
    src = TextCalibration(source="hub", dataset="parquet", data_files=[str(folder / "train.parquet")], n_samples=2, seq_len=32)
    got, manifest = load_documents(src)
    assert [d.text for d in got] == docs and manifest["data_files"] == [str(folder / "train.parquet")]


def test_hub_dataset_not_cached_offline_is_a_clear_error(tmp_path):
    """Run in a fresh interpreter with the offline switches set: nothing may reach the network."""
    import os
    import subprocess
    import sys

    code = (
        "from calibrate.config import TextCalibration\n"
        "from calibrate.text import load_documents\n"
        "from calibrate import CalibrationError\n"
        "try:\n"
        "    load_documents(TextCalibration(source='hub', dataset='gemma3n-quantize-tests/not-cached', name='raw', column='text'))\n"
        "except CalibrationError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(DATA.parents[1]))
    assert out.stdout.startswith("ERR calibration.text (hub: gemma3n-quantize-tests/not-cached, config raw, split train)"), out.stderr
    assert "not in the local datasets cache" in out.stdout and "offline: True" in out.stdout


# --------------------------------------------------------------------------- image and audio sources


def test_image_folder_pixel_values_match_the_image_processor(tmp_path, processor):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    arrays = {}
    for name in ("a.png", "b.jpg", "sub/c.png"):
        arr = rng.integers(0, 256, size=(40 + len(name), 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays[str(folder / name)] = folder / name
    (folder / "notes.txt").write_text("not an image")
    cfg = small(images={"source": "files", "path": str(folder), "n_samples": 2})
    cs = build_calibration(cfg, processor, seed=2)
    chosen = [it["id"] for it in cs.manifest["images"]["items"]]
    assert len(chosen) == 2 and set(chosen) <= set(arrays)
    ref = processor.image_processor(images=[Image.open(p).convert("RGB") for p in chosen], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(cs.images, ref, rtol=0, atol=0)


def test_image_and_audio_dataset_columns(tmp_path, processor):
    import datasets

    skdir = __import__("pathlib").Path(__import__("skimage.data").data.__file__).parent
    images = [(skdir / n).read_bytes() for n in ("coffee.png", "rocket.jpg")]
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": b, "path": None} for b in images]})
    ds.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "img"))
    clips = [(DATA / f"speech_calib_{i}.wav").read_bytes() for i in (0, 1)]
    ds = datasets.Dataset.from_dict({"speech": [{"bytes": b, "path": None} for b in clips]})
    ds.cast_column("speech", datasets.Audio()).save_to_disk(str(tmp_path / "aud"))

    cfg = small(images={"source": "hub", "dataset": str(tmp_path / "img"), "column": "picture", "n_samples": 2},
                audio={"source": "hub", "dataset": str(tmp_path / "aud"), "column": "speech", "n_samples": 2})
    cs = build_calibration(cfg, processor, seed=0)
    ref = processor.image_processor(images=[Image.open(skdir / n).convert("RGB") for n in ("coffee.png", "rocket.jpg")],
                                    return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(cs.images, ref, rtol=0, atol=0)
    for (feats, _), i in zip(cs.audio, (0, 1)):
        wave, _ = sf.read(DATA / f"speech_calib_{i}.wav", dtype="float32")
        torch.testing.assert_close(feats, processor.feature_extractor(wave, return_tensors="pt")["input_features"], rtol=0, atol=0)


def test_audio_files_are_resampled_mixed_and_cut(tmp_path, processor):
    wave16, _ = sf.read(DATA / "speech_calib_2.wav", dtype="float64")
    wave22 = resample_poly(wave16, 441, 320)  # 16 kHz -> 22.05 kHz
    folder = tmp_path / "clips"
    folder.mkdir()
    sf.write(folder / "a.wav", wave22, 22050, subtype="FLOAT")
    stereo = np.stack([wave16, 0.5 * wave16], axis=1)
    sf.write(folder / "b.flac", stereo, 16000, subtype="PCM_24")
    cfg = small(audio={"source": "files", "path": str(folder), "n_samples": 2, "max_seconds": 1.5})
    cs = build_calibration(cfg, processor, seed=0)
    fe = processor.feature_extractor
    # Independent reference: soundfile read, scipy resample (22050 -> 16000), channel mean, cut.
    a, _ = sf.read(folder / "a.wav", dtype="float32")
    a = resample_poly(a[: int(1.5 * 22050)].astype(np.float64), 320, 441).astype(np.float32)
    b, _ = sf.read(folder / "b.flac", dtype="float32")
    b = b[:24000].mean(axis=1)
    for (feats, mask), ref in zip(cs.audio, (a, b)):
        r = fe(ref, return_tensors="pt")
        torch.testing.assert_close(feats, r["input_features"], rtol=0, atol=0)
        assert torch.equal(mask, r["input_features_mask"])
    assert [i["source_rate"] for i in cs.manifest["audio"]["items"]] == [22050, 16000]
    assert [i["seconds"] for i in cs.manifest["audio"]["items"]] == [1.5, 1.5]


# --------------------------------------------------------------------------- bad input


def test_missing_column_names_source_and_columns(tmp_path, processor):
    path, _ = write_source(tmp_path, "jsonl", make_docs(3, 20), column="body")
    with pytest.raises(CalibrationError, match=r"corpus\.jsonl: line 1 has no key 'text' \(keys: body, other\)"):
        build_calibration(small(text={"source": "files", "path": str(path)}), processor, 0)
    pq_path, _ = write_source(tmp_path, "parquet", make_docs(3, 20), column="body")
    with pytest.raises(CalibrationError, match=r"corpus\.parquet: has no column 'content'; columns: body, n"):
        build_calibration(small(text={"source": "files", "path": str(pq_path), "column": "content"}), processor, 0)
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(CalibrationError, match=r"calibration.images \(hub: .*ds, split train\): has no column 'image'; columns: body"):
        build_calibration(small(images={"source": "hub", "dataset": str(tmp_path / "ds"), "n_samples": 1}), processor, 0)


@pytest.mark.parametrize("section", ["images", "audio"])
def test_empty_folder_names_the_folder(tmp_path, processor, section):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match=rf"calibration.{section} \(files: .*empty\): folder .*empty' holds no files"):
        build_calibration(small(**{section: {"source": "files", "path": str(empty), "n_samples": 1}}), processor, 0)


def test_unreadable_image_and_audio_name_the_file(tmp_path, processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CalibrationError, match=r"calibration.images \(files: .*\): .*broken\.png: unreadable image"):
        build_calibration(small(images={"source": "files", "path": str(tmp_path / "img"), "n_samples": 1}), processor, 0)
    (tmp_path / "aud").mkdir()
    (tmp_path / "aud" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(CalibrationError, match=r"calibration.audio \(files: .*\): .*broken\.wav: unreadable audio"):
        build_calibration(small(audio={"source": "files", "path": str(tmp_path / "aud"), "n_samples": 1}), processor, 0)


def test_too_few_tokens_names_the_source(tmp_path, processor):
    path, _ = write_source(tmp_path, "txt", make_docs(2, 30))
    with pytest.raises(CalibrationError, match=r"calibration.text \(files: .*txt\): too few tokens: \d+ tokens in 2 documents"):
        build_calibration(small(text={"source": "files", "path": str(path), "n_samples": 8, "seq_len": 64}), processor, 0)
    with pytest.raises(CalibrationError, match=r"calibration.text \(files: .*\): too few tokens: only \d+ of 2 documents hold 63 tokens, but n_samples is 4"):
        build_calibration(small(text={"source": "files", "path": str(path), "packing": False}), processor, 0)
    with pytest.raises(CalibrationError, match=r"calibration.text \(embedded, split calib\): too few tokens"):
        build_calibration(small(text={"n_samples": 5000, "seq_len": 4096}), processor, 0)


def test_more_images_than_the_source_holds_is_an_error(processor):
    with pytest.raises(CalibrationError, match=r"calibration.images \(embedded, split calib\): n_samples is 9 but the source holds only 8 images"):
        build_calibration(small(images={"n_samples": 9}), processor, 0)


def test_missing_path_is_an_error(tmp_path, processor):
    with pytest.raises(CalibrationError, match=r"calibration.audio \(files: .*nowhere\): path .* does not exist"):
        build_calibration(small(audio={"source": "files", "path": str(tmp_path / "nowhere"), "n_samples": 1}), processor, 0)
