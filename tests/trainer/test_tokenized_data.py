"""Issue 18, item 2: --tokenizer with text, JSON Lines, Parquet, Arrow and save_to_disk sources.

The reference for every format is the tokenizer itself: ``AutoTokenizer(doc)["input_ids"]`` and the EOS
id for each document, concatenated in document order, split by the documented rule (restated here:
``int(sha1(text)[:8], 16) % 10000 < val_percent * 100``)."""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mecefo.config import ConfigError, TrainConfig
from mecefo.data import Batches, CorpusFiles, check_length, prepare_corpus, stdlib_sources

EOS = 1  # conftest's bpe_tokenizer


def in_validation(text: str, val_percent: float = 5.0) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 10000 < val_percent * 100


@pytest.fixture(scope="module")
def documents():
    """60 pieces of the embedded corpus (1-3 kB, some non-ASCII), an empty one at index 7."""
    texts = [path.read_text()[:1000 + 40 * i] for i, path in enumerate(stdlib_sources()[200:260])]
    texts[3] += " naïve – ünïcödé ✓"
    texts[7] = ""
    assert sum(in_validation(t) for t in texts if t) >= 1, "the reference split needs a validation document"
    return texts


@pytest.fixture(scope="module")
def reference(bpe_tokenizer, documents):
    """(train, validation) token arrays, from the tokenizer called one document at a time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    assert tok.eos_token_id == EOS and len(tok) == 400
    train, val = [], []
    for text in documents:
        if text:
            (val if in_validation(text) else train).extend(tok(text)["input_ids"] + [EOS])
    return np.array(train), np.array(val)


def tokens(corpus: CorpusFiles) -> tuple[np.ndarray, np.ndarray]:
    return (np.fromfile(corpus.train, dtype=corpus.dtype).astype(np.int64),
            np.fromfile(corpus.val, dtype=corpus.dtype).astype(np.int64))


def write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))
    return path


def write_sources(kind: str, directory: Path, texts: list[str]) -> Path:
    """``texts`` as a source of ``kind``, one document each, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": [t or None for t in texts]})  # empty as null
    if kind == "text":
        (directory / "docs" / "b").mkdir(parents=True)
        for i, t in enumerate(texts):  # a tree, created out of order: read in sorted path order
            (directory / "docs" / ("b" if i >= 30 else "") / f"{i:03d}.txt").write_text(t)
        return directory / "docs"
    if kind == "jsonl":
        return write_jsonl(directory / "docs.jsonl", texts)
    if kind == "parquet":
        pq.write_table(table, directory / "docs.parquet", row_group_size=16)  # 4 row groups
        return directory / "docs.parquet"
    if kind == "arrow-file":
        with pa.ipc.new_file(directory / "docs.arrow", table.schema) as writer:
            for batch in table.to_batches(max_chunksize=25):
                writer.write_batch(batch)
        return directory / "docs.arrow"
    if kind in ("arrow-stream", "save_to_disk"):
        import datasets

        datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}).save_to_disk(directory / "ds")
        if kind == "save_to_disk":
            return directory / "ds"
        (arrow,) = (directory / "ds").glob("*.arrow")  # what datasets writes: the IPC stream format
        return arrow
    raise AssertionError(kind)


FORMATS = ["text", "jsonl", "parquet", "arrow-file", "arrow-stream", "save_to_disk"]


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_is_the_tokenizers_encoding_split_by_document(kind, bpe_tokenizer, documents, reference,
                                                                   tmp_path):
    source = write_sources(kind, tmp_path, documents)
    corpus = prepare_corpus([str(source)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer), workers=1)
    train, val = tokens(corpus)
    np.testing.assert_array_equal(train, reference[0])
    np.testing.assert_array_equal(val, reference[1])
    assert (corpus.dtype, corpus.vocab, corpus.eos, corpus.tokenizer) == ("uint16", 400, EOS, str(bpe_tokenizer))
    assert "59 documents" in corpus.description, corpus.description  # the empty one is not a document


def test_workers_order_and_fingerprint(bpe_tokenizer, documents, reference, tmp_path, capfd):
    """Two workers give the files one worker gives; reversing the records reverses the documents within
    each split, but no document changes split."""
    path = write_jsonl(tmp_path / "docs.jsonl", documents)
    one = prepare_corpus([str(path)], cache_dir=tmp_path / "one", tokenizer=str(bpe_tokenizer), workers=1)
    two = prepare_corpus([str(path)], cache_dir=tmp_path / "two", tokenizer=str(bpe_tokenizer), workers=2,
                         progress=True)
    assert "tokens/s" in capfd.readouterr().err  # the progress bar
    assert one.train != two.train and one.fingerprint == two.fingerprint
    assert Path(one.train).read_bytes() == Path(two.train).read_bytes()
    assert one.fingerprint == hashlib.sha256(reference[0].astype(np.uint16).tobytes()
                                             + reference[1].astype(np.uint16).tobytes()).hexdigest()

    backwards = prepare_corpus([str(write_jsonl(tmp_path / "rev.jsonl", documents[::-1]))],
                               cache_dir=tmp_path / "one", tokenizer=str(bpe_tokenizer), workers=2)

    def documents_of(split: np.ndarray) -> list[tuple]:
        ends = np.flatnonzero(split == EOS) + 1
        return [tuple(d) for d in np.split(split, ends)[:-1]]

    for a, b in zip(tokens(one), tokens(backwards)):
        assert documents_of(a) == documents_of(b)[::-1]


def test_cache_entry_reused_and_keyed_by_content(bpe_tokenizer, documents, tmp_path, monkeypatch):
    import mecefo.data

    path = write_jsonl(tmp_path / "docs.jsonl", documents)
    first = prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer))
    copy = tmp_path / "elsewhere"
    shutil.copytree(bpe_tokenizer, copy)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(mecefo.data, "tokenise_documents", no_tokenising)
        again = prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(copy))
    assert again.train == first.train and again.tokenizer == str(copy), "same tokenizer content, same entry"

    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    entries = {prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(copy)).train,
               prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer),
                              val_percent=20).train,
               prepare_corpus([str(write_jsonl(tmp_path / "docs.jsonl", documents, field="body"))],
                              cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer), text_field="body").train}
    assert first.train not in entries and len(entries) == 3
    assert not list((tmp_path / "cache" / "corpus").glob(".*")), "no temporary directory left behind"


def test_byte_level_records_without_a_tokenizer(documents, tmp_path):
    corpus = prepare_corpus([str(write_jsonl(tmp_path / "docs.jsonl", documents))], cache_dir=tmp_path / "cache")
    train = b"".join(t.encode() + b"\n\n" for t in documents if t and not in_validation(t))
    val = b"".join(t.encode() + b"\n\n" for t in documents if t and in_validation(t))
    assert Path(corpus.train).read_bytes() == train and Path(corpus.val).read_bytes() == val
    assert (corpus.dtype, corpus.vocab, corpus.tokenizer, corpus.eos) == ("uint8", 256, None, None)


def test_every_split_gets_a_document(bpe_tokenizer, tmp_path):
    """Documents that all hash into training: the one of smallest sha1 moves to validation; one document:
    the tail of its tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]
    texts = [t for t in texts if not in_validation(t, 1.0)][:3]
    corpus = prepare_corpus([str(write_jsonl(tmp_path / "few.jsonl", texts))], cache_dir=tmp_path / "cache",
                            tokenizer=str(bpe_tokenizer), val_percent=1.0, workers=1)
    moved = min(texts, key=lambda t: int(hashlib.sha1(t.encode()).hexdigest()[:16], 16))
    expected_train = [i for t in texts if t != moved for i in tok(t)["input_ids"] + [EOS]]
    train, val = tokens(corpus)
    assert train.tolist() == expected_train and val.tolist() == tok(moved)["input_ids"] + [EOS]

    corpus = prepare_corpus([str(write_jsonl(tmp_path / "one.jsonl", texts[:1]))], cache_dir=tmp_path / "cache",
                            tokenizer=str(bpe_tokenizer), val_percent=20, workers=1)
    whole = tok(texts[0])["input_ids"] + [EOS]
    cut = len(whole) // 5
    assert tokens(corpus)[0].tolist() == whole[:-cut] and tokens(corpus)[1].tolist() == whole[-cut:]


def test_a_vocabulary_beyond_uint16(tmp_path):
    """70,000 tokens: uint32 token files, and batches carry ids above 65,535 unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(69_998)} | {"[UNK]": 69_998, "</s>": 69_999}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        tmp_path / "wide")
    rng = np.random.default_rng(0)
    docs = [rng.integers(60_000, 69_998, size=50) for _ in range(20)]
    corpus = prepare_corpus([str(write_jsonl(tmp_path / "w.jsonl", [" ".join(f"w{i}" for i in d) for d in docs]))],
                            cache_dir=tmp_path / "cache", tokenizer=str(tmp_path / "wide"), val_percent=30, workers=1)
    assert (corpus.dtype, corpus.vocab, corpus.eos) == ("uint32", 70_000, 69_999)
    train = np.fromfile(corpus.train, dtype=np.uint32)
    assert train.max() > 65_535 and set(train.tolist()) <= set(np.concatenate(docs).tolist()) | {69_999}
    x, y = Batches(corpus, seq_len=16, micro_batch=4, seed=0, vocab_size=70_000).batch(0, 0)
    windows = {tuple(train[s:s + 17]) for s in range(len(train) - 16)}
    assert all(tuple(row) in windows for row in torch.cat([x, y[:, -1:]], dim=1).tolist())
    with pytest.raises(ValueError, match="has 70000 tokens but the model's vocabulary is 32000"):
        Batches(corpus, seq_len=16, micro_batch=4, seed=0, vocab_size=32_000)


def test_a_tokenised_bin_with_its_tokenizer(bpe_tokenizer, tmp_path):
    path = tmp_path / "tokens.bin"
    (np.arange(3000) % 400).astype(np.uint16).tofile(path)
    corpus = prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer))
    assert (corpus.vocab, corpus.eos, corpus.tokenizer) == (400, EOS, str(bpe_tokenizer))
    (np.arange(3001) % 401).astype(np.uint16).tofile(path)  # another size: another cache key
    with pytest.raises(ValueError, match="token id 400 is not in --tokenizer .* \\(vocabulary 400\\)"):
        prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer))


def test_old_corpus_json_still_loads(tmp_path):
    old = dict(train="t", val="v", dtype="uint8", vocab=256, fingerprint="f", description="d")
    corpus = CorpusFiles(**old)
    assert corpus.tokenizer is None and corpus.eos is None


def test_tokenizer_and_text_field_are_local_to_a_group():
    from mecefo.group import job_identity

    here = TrainConfig(data=["/a/x.jsonl"], tokenizer="/a/tok", text_field="text", tokenize_workers=2)
    there = TrainConfig(data=["/b/x.parquet"], tokenizer="/b/tok", text_field="body", tokenize_workers=16)
    assert job_identity(here, "abc", 1) == job_identity(there, "abc", 1), "the corpus is compared by its tokens"
    assert job_identity(here, "abc", 1) != job_identity(here, "abd", 1)


# ---------------------------------------------------------------------------- interrupted builds

def _build_script(source: Path, tokenizer: Path, cache: Path) -> str:
    """A build that stalls after its first chunk is written (so a test can interrupt it mid-way)."""
    return (f"import time, mecefo.tokenizing as t\n"
            f"t.CHUNK_DOCUMENTS = 4\n"
            f"add = t.SplitWriter.add\n"
            f"def slow(self, chunk):\n"
            f"    add(self, chunk); self.files[False].flush(); time.sleep(120)\n"
            f"t.SplitWriter.add = slow\n"
            f"from mecefo.data import prepare_corpus\n"
            f"prepare_corpus([{str(source)!r}], cache_dir={str(cache)!r}, tokenizer={str(tokenizer)!r}, workers=2)\n")


def _wait_mid_build(cache: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        started = [p for p in (cache / "corpus").glob(".*.tmp-*/train.bin") if p.stat().st_size > 0]
        if started:
            return started[0].parent
        time.sleep(0.1)
    raise AssertionError(f"the build did not get going (exit {proc.poll()}): {proc.stderr.read()}")


@pytest.mark.slow
def test_an_interrupted_or_killed_build_leaves_no_entry(bpe_tokenizer, documents, reference, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it): the build removes its directory
    proc = subprocess.Popen([sys.executable, "-c", _build_script(source, bpe_tokenizer, cache)], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tmp = _wait_mid_build(cache, proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) != 0
        assert "KeyboardInterrupt" in proc.stderr.read()
        assert not tmp.exists() and not list((cache / "corpus").iterdir())
        assert _group_ends(proc.pid, within_s=10), "its workers are stopped too"
    finally:
        _kill_group(proc)
    # SIGKILL to the whole process group: its temporary directory stays, unused, and the next build removes it
    proc = subprocess.Popen([sys.executable, "-c", _build_script(source, bpe_tokenizer, cache)], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tmp = _wait_mid_build(cache, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    assert tmp.exists() and [p.name for p in (cache / "corpus").iterdir()] == [tmp.name]
    corpus = prepare_corpus([str(source)], cache_dir=cache, tokenizer=str(bpe_tokenizer), workers=1)
    np.testing.assert_array_equal(tokens(corpus)[0], reference[0])
    assert not tmp.exists() and [p.name for p in (cache / "corpus").iterdir()] == [Path(corpus.train).parent.name]


def _group_ends(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_a_worker_that_dies_fails_the_build_in_one_line(bpe_tokenizer, documents, tmp_path, monkeypatch):
    import mecefo.tokenizing

    monkeypatch.setattr(mecefo.tokenizing, "CHUNK_DOCUMENTS", 4)
    add = mecefo.tokenizing.SplitWriter.add

    def kill_a_worker(self, chunk):  # after the first chunk is written
        add(self, chunk)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)

    monkeypatch.setattr(mecefo.tokenizing.SplitWriter, "add", kill_a_worker)
    with pytest.raises(ChildProcessError, match="a tokenising worker process died .*nothing was cached") as e:
        prepare_corpus([str(write_jsonl(tmp_path / "docs.jsonl", documents))], cache_dir=tmp_path / "cache",
                       tokenizer=str(bpe_tokenizer), workers=2)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "corpus").iterdir()) and not multiprocessing.active_children()


# ---------------------------------------------------------------------------- bad input

def test_tokenizer_directory_errors(bpe_tokenizer, tmp_path):
    source = str(write_jsonl(tmp_path / "docs.jsonl", ["some text"] * 3))
    with pytest.raises(ConfigError, match="--tokenizer 'gpt2' is not a local directory: .*nothing is downloaded") as e:
        prepare_corpus([source], cache_dir=tmp_path / "cache", tokenizer="gpt2")
    assert e.value.field == "tokenizer"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"--tokenizer {tmp_path / 'junk'}: cannot load a tokenizer from it"):
        prepare_corpus([source], cache_dir=tmp_path / "cache", tokenizer=str(tmp_path / "junk"))
    no_eos = tmp_path / "no-eos"
    shutil.copytree(bpe_tokenizer, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no EOS token"):
        prepare_corpus([source], cache_dir=tmp_path / "cache", tokenizer=str(no_eos))
    assert not list((tmp_path / "cache" / "corpus").iterdir())


def test_record_errors_name_the_file_and_line(bpe_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def prepare(path, **kw):
        return prepare_corpus([str(path)], cache_dir=tmp_path / "cache", tokenizer=str(bpe_tokenizer), **kw)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n\n{"text": "two"\n')
    with pytest.raises(ValueError, match=f"--data {bad}:3: not a JSON record"):
        prepare(bad)
    bad.write_text('{"text": "one"}\n["a list"]\n')
    with pytest.raises(ValueError, match=f"--data {bad}:2: a JSON list, not an object"):
        prepare(bad)
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=f"--data {bad}:1: --text-field 'text' holds a int, not text"):
        prepare(bad)
    with pytest.raises(ConfigError, match=rf"--text-field 'body': no such field in {bad}:1 \(its fields: text\)"):
        prepare(bad, text_field="body")
    pq.write_table(pa.table({"content": ["a", "b"], "id": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"--text-field 'text': no such field in .*t.parquet \(its fields: content, "
                                          r"id\)") as e:
        prepare(tmp_path / "t.parquet")
    assert e.value.field == "text_field"
    with pytest.raises(ValueError, match="column 'id' is int64, not text"):
        prepare(tmp_path / "t.parquet", text_field="id")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(ValueError, match=f"--data {corrupt}: not a readable Parquet file") as e:
        prepare(corrupt)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not an Arrow IPC file or stream"):
        prepare(corrupt.rename(tmp_path / "corrupt.arrow"))
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", None, ""])
    with pytest.raises(ValueError, match="no documents \\(every record's --text-field 'text' is empty\\)"):
        prepare(empty)
    short = prepare(write_jsonl(tmp_path / "short.jsonl", ["a b c"] * 2))
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 2 = 66"):
        check_length(short, 64)
    assert [p.name for p in (tmp_path / "cache" / "corpus").iterdir()] == [Path(short.train).parent.name]


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "{tmp}/none"], "--tokenizer '{tmp}/none' is not a local directory: tokenizers are read from "
                                    "disk only, nothing is downloaded at run time"),
    (["--tokenizer", "{tok}", "--text-field", "body"], "--text-field 'body': no such field in {tmp}/docs.jsonl:1 "
                                                       "(its fields: id, text)"),
    (["--tokenizer", "{tok}", "--data", "{tmp}/bad.parquet"], "--data {tmp}/bad.parquet: not a readable Parquet file"),
    (["--tokenizer", "{tok}", "--tokenize-workers", "0"], "argument --tokenize-workers: must be >= 1, got 0"),
])
def test_command_line_errors_are_one_line(args, message, bpe_tokenizer, tmp_path, capsys):
    from mecefo.launch import train_main

    write_jsonl(tmp_path / "docs.jsonl", ["some text"] * 3)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    fill = {"{tmp}": str(tmp_path), "{tok}": str(bpe_tokenizer)}
    args = [a.replace("{tmp}", str(tmp_path)).replace("{tok}", str(bpe_tokenizer)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", str(tmp_path / "docs.jsonl"), *args, "--run-dir", str(tmp_path / "run"),
                    "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    for key, value in fill.items():
        message = message.replace(key, value)
    assert exit_.value.code == 2 and err.startswith(f"mecefo-train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs pyarrow: pip install 'mecefo_kernels\[data\]'"):
        prepare_corpus([str(tmp_path / "x.parquet")], cache_dir=tmp_path / "cache")
