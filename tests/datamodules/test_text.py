"""The text datamodule: sources, tokenizers, the atomic token cache, packing layouts and resumable order."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datamodules.text as text_module
from datamodules.resumable import ResumableSampler
from datamodules.text import BlockDataset, StreamDataset, TextDataModule
from datamodules.text_sources import LocalFilesSource, StdlibSource, holdout_split
from datamodules.tokenizer import ByteTokenizer

DOCS = ["first line é", "second line", "", "fourth line with more words in it", "fifth"] * 40


@pytest.fixture()
def corpus(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    val = tmp_path / "valid.txt"
    val.write_text("\n".join(reversed(DOCS)) + "\n", encoding="utf-8")
    return {"train": str(train), "val": str(val), "test": str(val)}


def expected_bytes(docs):
    return [b for doc in docs for b in list(doc.encode("utf-8")) + [256]]


def test_byte_tokenizer_round_trips_utf8_and_has_an_eos_after_256_bytes():
    tok = ByteTokenizer()
    text = "naïve ∑ code\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([104, 105, 256, 33]) == "hi\n!"


def test_holdout_split_is_the_sha256_bucket_of_the_key():
    for key in ("json/decoder.py", "a:0", "x" * 100):
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 1000
        expected = "val" if bucket < 10 else "test" if bucket < 20 else "train"
        assert holdout_split(key, 10) == expected
    shares = [holdout_split(f"doc{i}", 50) for i in range(20000)]
    assert abs(shares.count("val") / 20000 - 0.05) < 0.006
    assert abs(shares.count("test") / 20000 - 0.05) < 0.006


def test_stdlib_corpus_is_sorted_deterministic_and_split_disjointly():
    source = StdlibSource()
    files = source.files()
    assert files == StdlibSource().files()
    assert [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    assert len(files) > 300 and not any(rel.startswith("site-packages/") for rel, _ in files)
    assert any(rel == "json/decoder.py" for rel, _ in files)
    val_files = [path for rel, path in files if holdout_split(rel, 10) == "val"]
    assert 0 < len(val_files) < len(files) // 20
    val_docs = list(source.documents("val"))
    assert val_docs == [p.read_bytes().decode("utf-8", errors="replace").removesuffix("\n") for p in val_files]
    assert source.describe("val") == StdlibSource().describe("val")


def test_local_text_files_are_cached_once_and_reused(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dm = TextDataModule(data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(cache))
    dm.prepare_data()
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 6 and all(f.endswith((".bin", ".json")) for f in files)  # no temporary file left
    dm.setup("fit")
    assert dm.tokens["train"].tolist() == expected_bytes(DOCS)
    assert isinstance(dm.tokens["train"], np.memmap)
    meta = json.loads(next(cache.glob("*train*.json")).read_text())
    assert meta["num_documents"] == len(DOCS) and meta["num_tokens"] == len(expected_bytes(DOCS))
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(text_module, "build_token_cache", must_not_rebuild)
    again = TextDataModule(data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(cache))
    again.prepare_data()
    again.setup("fit")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert np.array_equal(again.tokens["val"], dm.tokens["val"])


def test_data_files_replace_the_embedded_corpus_a_config_names(corpus, tmp_path):
    """The demo config says dataset: stdlib; --data.init_args.data_files on top of it trains on the files."""
    dm = TextDataModule(dataset="stdlib", data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(tmp_path))
    assert isinstance(dm.source, LocalFilesSource) and dm.label == "files"
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokens["train"].tolist() == expected_bytes(DOCS)


def test_interrupted_build_leaves_no_cache_and_the_next_build_succeeds(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_documents = LocalFilesSource.documents

    def failing(self, split):
        for i, doc in enumerate(real_documents(self, split)):
            if i == 50:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(LocalFilesSource, "documents", failing)
    dm = TextDataModule(data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(cache))
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(LocalFilesSource, "documents", real_documents)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokens["train"].tolist() == expected_bytes(DOCS)


def test_cache_key_follows_the_files_the_split_and_the_tokenizer(corpus, tmp_path):
    dm = TextDataModule(data_files=corpus, cache_dir=str(tmp_path / "c"))
    stem_train, key_train, _ = dm.cache_location("train")
    assert dm.cache_location("val")[1] != key_train
    with open(corpus["train"], "a") as f:
        f.write("one more line\n")
    assert TextDataModule(data_files=corpus, cache_dir=str(tmp_path / "c")).cache_location("train")[1] != key_train


def test_missing_val_and_test_are_carved_out_of_train_disjointly(tmp_path):
    lines = [f"document number {i}" for i in range(300)]
    (tmp_path / "only.txt").write_text("\n".join(lines) + "\n")
    source = LocalFilesSource({"train": str(tmp_path / "only.txt")}, holdout_permille=100)
    docs = {split: list(source.documents(split)) for split in ("train", "val", "test")}
    for split in ("val", "test"):
        assert docs[split] == [line for i, line in enumerate(lines) if holdout_split(f"only.txt:{i}", 100) == split]
        assert docs[split]
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(lines)


def test_jsonl_and_parquet_records_give_their_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(["x y", "z\n"])) + "\n")
    pq.write_table(pa.table({"body": ["p", "q r"]}), tmp_path / "b.parquet")
    source = LocalFilesSource({"train": [str(jsonl), str(tmp_path / "b.parquet")]}, text_field="body")
    assert [t for _, t in source._keyed("train")] == ["x y", "z\n", "p", "q r"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(LocalFilesSource({"train": str(jsonl)})._keyed("train"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        LocalFilesSource({"train": str(tmp_path / "nope.txt")})


def test_offline_hub_dataset_without_cache_raises_one_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    dm = TextDataModule(dataset="wikitext", dataset_config="wikitext-103-raw-v1", cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    for expected in ("'wikitext'", "wikitext-103-raw-v1", "'train'", "data_files", "val:", "jsonl"):
        assert expected in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_hub_dataset_rows_are_documents_of_the_named_splits(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    for split, rows in (("train", ["t0", "t1", "t2"]), ("validation", ["v0"])):
        (tmp_path / f"{split}.txt").write_text("\n".join(rows) + "\n")
    files = {s: str(tmp_path / f"{s}.txt") for s in ("train", "validation")}
    real = datasets.load_dataset
    asked = []

    def local_load(name, config, split):
        asked.append((name, config, split))
        return real("text", data_files=files, split=split, cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", local_load)
    dm = TextDataModule(dataset="corpus", dataset_config="v1", split_names={"test": "validation"}, seq_len=2)
    dm.cache_dir = tmp_path / "c"
    dm.prepare_data()
    dm.setup()
    assert asked == [("corpus", "v1", "train"), ("corpus", "v1", "validation"), ("corpus", "v1", "validation")]
    assert dm.tokens["train"].tolist() == expected_bytes(["t0", "t1", "t2"])
    assert dm.tokens["val"].tolist() == dm.tokens["test"].tolist() == expected_bytes(["v0"])


def test_hugging_face_tokenizer_loads_from_a_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "</s>": 1, "first": 2, "line": 3, "second": 4, "fifth": 5}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    train = tmp_path / "train.txt"
    train.write_text("first line\nsecond line x\nfifth\n" * 30)
    dm = TextDataModule(data_files={"train": str(train)}, tokenizer=str(tmp_path / "tok"), seq_len=4)
    dm.cache_dir = tmp_path / "c"
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 6
    assert dm.tokens["train"][:9].tolist() == [2, 3, 1, 4, 3, 0, 1, 5, 1]


def test_blocks_are_consecutive_windows_with_next_token_labels():
    tokens = np.arange(50, dtype=np.uint16)
    blocks = BlockDataset(tokens, 8)
    assert len(blocks) == 6
    item = blocks[2]
    assert item["input_ids"].tolist() == list(range(16, 24)) and item["labels"].tolist() == list(range(17, 25))
    assert item["input_ids"].dtype == torch.int64


def test_stream_batches_continue_every_row_of_the_previous_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    streams = StreamDataset(tokens, seq_len=10, num_streams=4)
    loader = DataLoader(streams, batch_size=4, sampler=ResumableSampler(streams, shuffle=False), drop_last=True)
    batches = list(loader)
    assert len(batches) == streams.segments == 24
    rows = torch.cat([b["input_ids"] for b in batches], dim=1)  # [4, 240]
    labels = torch.cat([b["labels"] for b in batches], dim=1)
    for j in range(4):
        start = j * streams.stream_len
        assert rows[j].tolist() == list(range(start, start + 240))
        assert labels[j].tolist() == list(range(start + 1, start + 241))


def test_streams_are_shared_between_ranks_without_overlap():
    streams = StreamDataset(np.arange(2000, dtype=np.uint16), seq_len=10, num_streams=4)
    per_rank = []
    for rank in range(2):
        loader = DataLoader(
            streams, batch_size=2, sampler=ResumableSampler(streams, num_replicas=2, rank=rank, shuffle=False)
        )
        batches = list(loader)
        rows = torch.cat([b["input_ids"] for b in batches], dim=1)
        assert all((row[1:] - row[:-1] == 1).all() for row in rows)  # each row continues itself
        per_rank.append(set(rows.flatten().tolist()))
    assert not per_rank[0] & per_rank[1]


def test_unigram_baseline_is_the_add_one_cross_entropy_of_val_under_train(corpus, tmp_path):
    dm = TextDataModule(data_files=corpus, cache_dir=str(tmp_path))
    dm.tokens = {"train": np.array([0, 0, 1, 2], dtype=np.uint16), "val": np.array([5, 0, 1, 1], dtype=np.uint16)}
    counts = np.ones(257)
    counts[[0, 1, 2]] += [2, 1, 1]
    probs = counts / counts.sum()
    expected = -(np.log(probs[0]) + 2 * np.log(probs[1])) / 3  # targets are tokens[1:]
    assert dm.unigram_baseline("val") == pytest.approx(expected, rel=1e-12)


def test_bad_arguments_raise_clear_errors(corpus):
    with pytest.raises(ValueError, match="train_layout"):
        TextDataModule(train_layout="random")
    with pytest.raises(ValueError, match=r"either dataset \('wikitext'\) or data_files.*dataset null"):
        TextDataModule(dataset="wikitext", data_files=corpus)
    with pytest.raises(ValueError, match="data_files keys"):
        TextDataModule(data_files={"validation": corpus["val"]})


# ------------------------------------------------------------------------------------------ bad input files


def test_a_broken_jsonl_line_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:3: not valid JSON .*one record like .*fix or remove that line"):
        list(LocalFilesSource({"train": str(path)})._keyed("train"))


@pytest.mark.parametrize("value, shown", [(12345, "int 12345"), (["a"], "list \\['a'\\]")])
def test_a_jsonl_record_whose_text_is_not_a_string_is_an_error_naming_the_line(tmp_path, value, shown):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"docs\.jsonl:2: field 'text' holds {shown}, not a string; .*text_field"):
        list(LocalFilesSource({"train": str(path)})._keyed("train"))


def test_a_binary_file_given_as_text_is_an_error_naming_it(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 20)  # NUL bytes and 128 undecodable bytes in every 256
    with pytest.raises(ValueError, match=r"weights\.txt, line \d+: not UTF-8 text \(.*undecodable bytes.*convert it"):
        list(LocalFilesSource({"train": str(path)})._keyed("train"))


def test_a_few_undecodable_bytes_are_replaced_with_a_warning_that_counts_them(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(("plain line\n" * 300).encode() + b"caf\xe9 au lait\n")
    with pytest.warns(UserWarning, match=r"latin\.txt, line 301: 1 bytes that are not UTF-8 .*replaced by U\+FFFD"):
        docs = [text for _, text in LocalFilesSource({"train": str(path)})._keyed("train")]
    assert docs[-1] == "caf\ufffd au lait\n" and docs[0] == "plain line\n"


def test_a_truncated_cache_metadata_file_is_an_error_naming_it_and_the_fix(corpus, tmp_path):
    dm = TextDataModule(data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    stem, _, _ = dm.cache_location("train")
    meta = stem.with_name(stem.name + ".json")
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=r"metadata .*\.json is not valid JSON .*Delete .*\.json and .*\.bin"):
        TextDataModule(data_files=corpus, seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache")).prepare_data()


def test_a_cache_folder_that_cannot_be_written_is_an_error_before_tokenizing(corpus, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dm = TextDataModule(data_files=corpus, seq_len=16, cache_dir=str(blocker / "cache"))
    monkeypatch.setattr(dm.source, "documents", lambda split: pytest.fail("tokenized before the check"))
    with pytest.raises(ValueError, match=r"token cache folder .*a_file/cache cannot be written .*cache_dir"):
        dm.prepare_data()
