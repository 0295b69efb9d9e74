"""Data pipeline: packing, resume, sharding, sources, tokenizers, bad input."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from efficient_lm.config import DataConfig
from efficient_lm.data import (
  ByteTokenizer,
  CharTokenizer,
  DataError,
  make_iterator,
  make_tokenizer,
)
from efficient_lm.data import sources
from efficient_lm.data.packing import PackedBatchIterDataset, PieceOrder, Pieces
from tests.helpers import train_sentencepiece

SHAKESPEARE = (
  pathlib.Path(__file__).resolve().parents[2]
  / "shared"
  / "data"
  / "tinyshakespeare.txt"
)

# Distinct documents of uneven lengths, so rows mix full and partial pieces.
DOCS = [
  (f"doc{i} " + "abcdefghij"[i] * (3 + 7 * i) + f" end{i}\n") for i in range(10)
]


def _text_cfg(tmp_path, docs=DOCS, **overrides) -> DataConfig:
  for i, doc in enumerate(docs):
    data = doc if isinstance(doc, bytes) else doc.encode()
    (tmp_path / f"{i:02d}.txt").write_bytes(data)
  fields = dict(
    source="text",
    path=str(tmp_path),
    seq_len=16,
    tokenizer="byte",
    eval_fraction=0.0,
  )
  return DataConfig(**(fields | overrides))


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _segments(batch):
  """Yields (inputs, targets, positions) of every piece in a batch."""
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in range(1, seg.max() + 1):
      cols = seg == s
      yield (
        batch["inputs"][b, cols],
        batch["targets"][b, cols],
        batch["positions"][b, cols],
      )


# ------------------------------------------------------------------ packing


def test_rows_are_packed_pieces_of_single_documents(tmp_path):
  cfg = _text_cfg(tmp_path)
  tok = make_tokenizer(cfg)
  docs = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS]
  it = make_iterator(cfg, "train", global_batch_size=4, seed=0)
  pieces_seen = 0
  for batch in _batches(it, 12):
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    for v in batch.values():
      assert v.shape == (4, 16) and v.dtype == np.int32
    seg_BT = batch["segment_ids"]
    # Segments are numbered 1, 2, ... left to right; padding is a suffix.
    assert (np.diff(seg_BT, axis=1)[seg_BT[:, 1:] > 0] >= 0).all()
    pad = seg_BT == 0
    assert (np.diff(pad.astype(int), axis=1) >= 0).all()
    assert (batch["inputs"][pad] == 0).all()
    assert (batch["targets"][pad] == 0).all()
    for inputs, targets, positions in _segments(batch):
      pieces_seen += 1
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      piece = list(inputs) + [targets[-1]]
      # The whole piece, targets included, lies inside ONE document.
      assert any(
        piece == d[i : i + len(piece)] for d in docs for i in range(len(d))
      ), piece
  assert pieces_seen > 12 * 4  # some rows really hold several pieces


def test_pieces_cover_every_pair_once():
  tokens_T = np.arange(100, dtype=np.int32)
  start_N, end_N = np.array([0, 10, 11, 40]), np.array([10, 11, 40, 100])
  pieces = Pieces.from_spans(tokens_T, start_N, end_N, seq_len=8)
  assert (1 <= pieces.length_P).all() and (pieces.length_P <= 8).all()
  pairs = [
    (s + j, s + j + 1)
    for s, n in zip(pieces.start_P, pieces.length_P, strict=True)
    for j in range(n)
  ]
  expected = [
    (t, t + 1)
    for s, e in zip(start_N, end_N, strict=True)
    for t in range(s, e - 1)
  ]
  assert sorted(pairs) == expected  # each pair once; none across spans


def test_every_piece_is_emitted_once_per_epoch():
  """Over many batches the emitted pieces are exactly the stream's first
  `next_piece` pieces: the one that opens the next batch is not lost."""
  rng = np.random.default_rng(0)
  bounds = np.cumsum(np.concatenate([[0], rng.integers(2, 40, 60)]))
  # Token t has value t, so a piece's first input names the piece.
  pieces = Pieces.from_spans(
    np.arange(bounds[-1], dtype=np.int32), bounds[:-1], bounds[1:], seq_len=16
  )
  order = PieceOrder(len(pieces), shuffle=True, seed=5)
  it = iter(
    PackedBatchIterDataset(
      pieces, order, seq_len=16, num_rows=3, row_start=0, row_stop=3
    )
  )
  piece_of_start = {int(s): p for p, s in enumerate(pieces.start_P)}
  emitted = [
    piece_of_start[int(inputs[0])]
    for _ in range(60)
    for inputs, _, _ in _segments(next(it))
  ]
  stream = np.concatenate(
    [order.epoch(e) for e in range(len(emitted) // len(pieces) + 2)]
  )
  assert len(emitted) > 2 * len(pieces)  # crosses two epoch boundaries
  assert it.get_state()["next_piece"] == len(emitted)
  assert sorted(emitted) == sorted(stream[: len(emitted)])


def test_epochs_are_permutations_that_differ():
  order = PieceOrder(50, shuffle=True, seed=3)
  e0, e1 = order.epoch(0), order.epoch(1)
  assert sorted(e0) == sorted(e1) == list(range(50))
  assert list(e0) != list(e1)
  np.testing.assert_array_equal(
    e0, PieceOrder(50, shuffle=True, seed=3).epoch(0)
  )
  assert list(PieceOrder(50, shuffle=True, seed=4).epoch(0)) != list(e0)
  assert list(PieceOrder(50, shuffle=False, seed=3).epoch(7)) == list(range(50))


# ------------------------------------------------- resume, determinism, shards


def test_resume_is_exact_across_epoch_boundaries(tmp_path):
  cfg = _text_cfg(tmp_path)
  make = lambda: make_iterator(cfg, "train", global_batch_size=2, seed=7)
  it = make()
  reference = _batches(it, 40)
  # 40 batches span more than two epochs, so some k below sits on a boundary.
  assert it.get_state()["grain"]["next_piece"] > 2 * it.num_pieces
  for k in range(0, 34):
    it = make()
    _batches(it, k)
    state = json.loads(json.dumps(it.get_state()))  # as a JSON checkpoint
    restored = make()
    restored.set_state(state)
    _assert_same(_batches(restored, 6), reference[k : k + 6])


def test_two_fresh_iterators_agree_and_seeds_differ(tmp_path):
  cfg = _text_cfg(tmp_path)
  make = lambda seed: make_iterator(
    cfg, "train", global_batch_size=4, seed=seed
  )
  _assert_same(_batches(make(0), 8), _batches(make(0), 8))
  a, b = _batches(make(0), 8), _batches(make(1), 8)
  assert any(
    (x["inputs"] != y["inputs"]).any() for x, y in zip(a, b, strict=True)
  )


def test_eval_is_deterministic_and_disjoint_from_train(tmp_path):
  lines = [json.dumps({"text": f"record {i} " + "xyz" * i}) for i in range(20)]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n\n")
  cfg = DataConfig(
    source="jsonl", path=str(path), seq_len=16, eval_fraction=0.25
  )
  make = lambda split: make_iterator(cfg, split, global_batch_size=3, seed=0)
  _assert_same(_batches(make("eval"), 5), _batches(make("eval"), 5))
  tok = make_tokenizer(cfg)
  text = lambda batches: {
    tok.decode(i) for b in batches for i, _, _ in _segments(b)
  }
  eval_text, train_text = (
    "".join(text(_batches(make("eval"), 10))),
    "".join(text(_batches(make("train"), 10))),
  )
  assert "record 15" in eval_text and "record 19" in eval_text
  assert "record 14" not in eval_text and "record 15" not in train_text


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_rows_of_the_global_batch(
  tmp_path, process_count
):
  cfg = _text_cfg(tmp_path)
  make = lambda p, n: make_iterator(
    cfg, "train", global_batch_size=8, seed=0, process_index=p, process_count=n
  )
  whole = _batches(make(0, 1), 6)
  shards = [make(p, process_count) for p in range(process_count)]
  for step in range(6):
    parts = [next(it) for it in shards]
    for k in whole[step]:
      assert parts[0][k].shape[0] == 8 // process_count
      np.testing.assert_array_equal(
        np.concatenate([p[k] for p in parts]), whole[step][k]
      )
  # The state does not depend on the process: resume on another count.
  states = [it.get_state() for it in shards]
  assert all(s == states[0] for s in states)
  single = make(0, 1)
  single.set_state(states[0])
  _assert_same([next(single)], [_batches(make(0, 1), 7)[6]])


def test_state_from_another_configuration_is_refused(tmp_path):
  cfg = _text_cfg(tmp_path)
  state = make_iterator(cfg, "train", global_batch_size=4, seed=0).get_state()
  other = make_iterator(cfg, "train", global_batch_size=2, seed=0)
  with pytest.raises(DataError, match=r"global_batch_size=4 \(saved\) vs 2"):
    other.set_state(state)


# ------------------------------------------------------------------ sources


def test_default_corpus_is_deterministic_and_nontrivial():
  cfg = DataConfig(seq_len=128)
  a, b = sources.load_corpus(cfg), sources.load_corpus(cfg)
  assert a.names == b.names and a.docs == b.docs
  assert list(a.names) == sorted(a.names)
  assert len(a.docs) >= 50 and sum(map(len, a.docs)) > 1_000_000
  assert not any("_sysconfigdata" in n or "site-packages" in n for n in a.names)
  assert any(n.endswith("/os.py") for n in a.names)
  assert 0.05 < a.is_eval_N.mean() < 0.15
  train = make_iterator(cfg, "train", global_batch_size=4, seed=0)
  evals = make_iterator(cfg, "eval", global_batch_size=4, seed=0)
  assert train.num_tokens > 5 * evals.num_tokens > 0
  _assert_same(
    _batches(train, 2),
    _batches(make_iterator(cfg, "train", global_batch_size=4, seed=0), 2),
  )
  assert (next(evals)["segment_ids"] > 0).mean() > 0.9


def test_text_split_is_the_last_fraction_of_the_token_stream(tmp_path):
  cfg = _text_cfg(
    tmp_path, docs=["a" * 500, "b" * 500], tokenizer="char", eval_fraction=0.1
  )
  train = make_iterator(cfg, "train", global_batch_size=2, seed=0)
  evals = make_iterator(cfg, "eval", global_batch_size=2, seed=0)
  assert (train.num_tokens, evals.num_tokens) == (900, 100)
  assert (next(evals)["inputs"] == 1).all()  # only "b", the vocab's 2nd


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="no tinyshakespeare")
def test_tinyshakespeare_matches_nanogpt_char_split():
  cfg = DataConfig(
    source="text",
    path=str(SHAKESPEARE),
    seq_len=64,
    tokenizer="char",
    eval_fraction=0.1,
  )
  tok = make_tokenizer(cfg)
  assert tok.vocab_size == 65
  train = make_iterator(
    cfg, "train", global_batch_size=12, seed=0, tokenizer=tok
  )
  evals = make_iterator(
    cfg, "eval", global_batch_size=12, seed=0, tokenizer=tok
  )
  assert (train.num_tokens, evals.num_tokens) == (1_003_854, 111_540)
  assert next(train)["inputs"].shape == (12, 64)


# --------------------------------------------------------------- tokenizers


def test_char_vocabulary_comes_from_the_text(tmp_path):
  cfg = _text_cfg(tmp_path, docs=["hello world\n", "low"], tokenizer="char")
  tok = make_tokenizer(cfg)
  assert isinstance(tok, CharTokenizer)
  assert tok.chars == "\n dehlorw" and tok.vocab_size == 9
  assert tok.pad_id is None and tok.bos_id is None and tok.eos_id is None
  assert tok.encode("dew") == [2, 3, 8]
  with pytest.raises(DataError, match=r"'z' at character 1 .*9 characters"):
    tok.encode("oz")


@pytest.mark.parametrize("text", ["plain ascii", "Grüße, 世界 🙂", ""])
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (
    256,
    257,
    258,
  )
  ids = tok.encode(text)
  assert ids == list(text.encode()) == tok.encode(text.encode())
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
  assert tok.decode(ids + [300]) == text + "\ufffd"


def test_char_round_trip():
  tok = CharTokenizer("Grüße, 世界 🙂")
  text = "世界, Grüße 🙂"
  assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_model_file(tmp_path):
  train_sentencepiece(tmp_path)
  (tmp_path / "docs").mkdir()
  cfg = _text_cfg(tmp_path / "docs", tokenizer=str(tmp_path / "sp.model"))
  tok = make_tokenizer(cfg)
  assert tok.vocab_size == 40 and tok.bos_id is not None
  assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
  batch = next(
    make_iterator(cfg, "train", global_batch_size=2, seed=0, tokenizer=tok)
  )
  assert batch["inputs"].max() < 40


def test_non_utf8_file_bytes_ok_char_refused(tmp_path):
  bad = b"caf\xe9 latin-1 text, " * 4  # \xe9 is not UTF-8 on its own
  cfg = _text_cfg(tmp_path, docs=[bad])
  batch = next(make_iterator(cfg, "train", global_batch_size=2, seed=0))
  assert 0xE9 in batch["inputs"]
  with pytest.raises(DataError, match=r"00\.txt.*UTF-8 at byte offset 3"):
    make_tokenizer(dataclasses.replace(cfg, tokenizer="char"))


# ---------------------------------------------------------------- bad input


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(DataError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)  # one line


def _iterator(cfg, split="train", batch=2, **kw):
  return make_iterator(cfg, split, global_batch_size=batch, seed=0, **kw)


def test_missing_empty_and_unmatched_paths(tmp_path):
  text = lambda path, **kw: DataConfig(source="text", path=str(path), **kw)
  _raises(r"nope\.txt'.*no such file", _iterator, text(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_bytes(b"")
  _raises(r"empty\.txt' is empty", _iterator, text(tmp_path / "empty.txt"))
  (tmp_path / "sub").mkdir()
  _raises(r"sub'.*no \*\.txt files", _iterator, text(tmp_path / "sub"))
  _raises(r"\*\.md'.*glob matched no files", _iterator, text(tmp_path / "*.md"))
  _raises(r"data.path is empty", _iterator, DataConfig(source="jsonl"))
  _raises(
    r"tokenizer='words'.*'byte', 'char'",
    make_tokenizer,
    DataConfig(tokenizer="words"),
  )
  _raises(
    r"missing\.model'.*no such SentencePiece",
    make_tokenizer,
    DataConfig(tokenizer=str(tmp_path / "missing.model")),
  )


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  jsonl = DataConfig(source="jsonl", path=str(path))
  path.write_text('{"text": "ok"}\n{"text": broken\n')
  _raises(r"d\.jsonl:2: not valid JSON", _iterator, jsonl)
  path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
  _raises(
    r"d\.jsonl:3: expected an object with a string 'text' field, got "
    r"keys \['body'\]",
    _iterator,
    jsonl,
  )
  path.write_text('{"text": "ok"}\n\n{"text": 3}\n')
  _raises(r"d\.jsonl:3: 'text' must be a string, got int$", _iterator, jsonl)
  path.write_text('{"text": ""}\n')
  _raises(r"no documents", _iterator, jsonl)


def test_too_few_tokens_names_split_count_and_seq_len(tmp_path):
  cfg = _text_cfg(tmp_path, docs=["x" * 40], seq_len=32, eval_fraction=0.1)
  _iterator(cfg, "train")  # 37 of 42 tokens: one row of 33 fits
  _raises(
    r"split 'eval' has 5 tokens.*seq_len\+1=33.*data.seq_len=32",
    _iterator,
    cfg,
    "eval",
  )
  _raises(
    r"split 'eval' has 0 tokens \(data.eval_fraction=0.0\)",
    _iterator,
    dataclasses.replace(cfg, eval_fraction=0.0),
    "eval",
  )


def test_bad_batch_and_split_arguments(tmp_path):
  cfg = _text_cfg(tmp_path)
  _raises(
    r"global_batch_size=6 is not divisible by process_count=4",
    _iterator,
    cfg,
    batch=6,
    process_index=0,
    process_count=4,
  )
  _raises(
    r"process_index=2, process_count=2",
    _iterator,
    cfg,
    batch=4,
    process_index=2,
    process_count=2,
  )
  _raises(r"split='test'", _iterator, cfg, "test")
