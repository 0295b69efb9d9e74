"""Hugging Face tokenizer.json (data.HFTokenizer): the library's own ids and
text, exact bytes per id for byte-level and SentencePiece-style BPE, special
ids from the checkpoint's files, the run's copy, and a run trained, resumed
and evaluated on one after the original file is gone.

The tokenizers are trained here, on a few lines, with the `tokenizers`
library itself: a GPT-2 / Qwen-style byte-level BPE, and a Llama 2-style
BPE with byte_fallback and Metaspace (with its Llama-legacy and Gemma
variants: a Prepend normalizer, no prefix space at all).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import (
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from efficient_lm import data as data_lib
from efficient_lm.config import DataConfig
from efficient_lm.data import DataError, HFTokenizer
from efficient_lm.data.pipeline import encode_documents
from efficient_lm.data.sources import Corpus
from tests.helpers import REPO, SMALL_FLAGS, cli_env, train_cli

TRAIN_TEXT = "\n".join(
  [
    "the quick brown fox jumps over the lazy dog",
    "café naïve résumé über smörgåsbord",
    "a stitch in time saves nine",
    "日本語 the fox",
  ]
  * 30
)
# Multi-line, tabs, double spaces, non-ASCII pieces the BPE learnt, and an
# emoji and characters it never saw (byte-level bytes, byte_fallback bytes).
TEXT = (
  "The café's naïve fox — 日本語\n"
  "\tjumps 🙂 over  the lazy dog.\n"
  "ünïcödé résumé, Ωμέγα 🦊🦊\n"
)
_SPECIALS = ["<unk>", "<s>", "</s>"]
_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _byte_level(path):
  """GPT-2 / Qwen style: ByteLevel pre-tokenizer and decoder, every byte in
  the alphabet, one special token (id 0)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator([TRAIN_TEXT], trainer)
  tok.save(str(path))
  return path


def _metaspace(path, variant="llama"):
  """Llama 2 style: BPE with byte_fallback (<0xNN> pieces in the model's
  vocabulary, not added tokens), <unk> <s> </s> = 0 1 2, a post-processor
  that adds <s> (which encode must not). `variant`: "llama" (Metaspace
  pre-tokenizer, prefix space on the first piece), "legacy" (Prepend + Replace
  normalizer, older Llama files), "gemma" (Replace normalizer only: no
  prefix space)."""
  tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement="\u2581", prepend_scheme="first", split=False
  )
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=_SPECIALS + _BYTES, show_progress=False
  )
  tok.train_from_iterator([TRAIN_TEXT], trainer)
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", 1)]
  )
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback()]
  steps.append(decoders.Fuse())
  if variant != "gemma":
    steps.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(steps)
  if variant != "llama":
    tok.pre_tokenizer = None
    replace = normalizers.Replace(" ", "\u2581")
    prepend = [normalizers.Prepend("\u2581")] if variant == "legacy" else []
    tok.normalizer = normalizers.Sequence([*prepend, replace])
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = [
    t for t in spec["added_tokens"] if t["content"] in _SPECIALS
  ]
  path.write_text(json.dumps(spec), encoding="utf-8")
  return path


# variant -> (builder, bytes the tokenizer's prefix space adds to a text)
KINDS = {
  "byte_level": (_byte_level, 0),
  "llama": (_metaspace, 1),
  "legacy": (lambda p: _metaspace(p, "legacy"), 1),
  "gemma": (lambda p: _metaspace(p, "gemma"), 0),
}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_text_and_bytes_per_id_are_exact(tmp_path, kind):
  build, prefix = KINDS[kind]
  path = build(tmp_path / "tokenizer.json")
  lib = tokenizers.Tokenizer.from_file(str(path))
  tok = HFTokenizer(str(path))
  assert tok.vocab_size == lib.get_vocab_size(with_added_tokens=True)
  assert tok.mask_id == tok.vocab_size
  ids = tok.encode(TEXT)
  assert ids == lib.encode(TEXT, add_special_tokens=False).ids
  np.testing.assert_array_equal(
    tok.encode_array(TEXT.encode(), "doc"), np.asarray(ids, np.int32)
  )
  assert tok.decode(ids) == lib.decode(ids) == TEXT
  pieces = [lib.id_to_token(i) for i in ids]
  if kind != "byte_level":  # the emoji and Ω came in byte_fallback pieces
    assert "<0xF0>" in pieces and "<0xCE>" in pieces
  assert any(len(p) > 2 for p in pieces)  # merges were learnt and used
  # Exact: the text's UTF-8 bytes, plus the prefix space where the
  # tokenizer prepends one (it is a byte of the first piece, which the model
  # predicts; one per document in the pipeline). Specials stand for none.
  bytes_V = tok.bytes_per_id()
  assert bytes_V.shape == (tok.vocab_size,) and bytes_V.dtype == np.int64
  special = [i for i in lib.get_added_tokens_decoder()]
  total = bytes_V[special + ids + special].sum()
  assert total == len(TEXT.encode("utf-8")) + prefix
  assert tok.decode([*ids[:3], tok.vocab_size + 5]).endswith("\ufffd")


def _files(directory, config=None, tokenizer_config=None):
  for name, content in [
    ("config.json", config),
    ("tokenizer_config.json", tokenizer_config),
  ]:
    if content is not None:
      (directory / name).write_text(json.dumps(content))


def test_special_ids_explicit_then_config_then_tokenizer_config(tmp_path):
  path = str(_metaspace(tmp_path / "tokenizer.json"))  # <unk> <s> </s>: 0 1 2
  tok = HFTokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)
  _files(
    tmp_path,
    tokenizer_config={
      "bos_token": "<s>",
      "eos_token": {"content": "</s>", "special": True},
      "pad_token": None,
    },
  )
  tok = HFTokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
  # config.json wins, key by key; eos may be a list: its first.
  _files(tmp_path, config={"eos_token_id": [0, 2], "pad_token_id": 0})
  tok = HFTokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)
  tok = HFTokenizer(path, bos_id=2, pad_id=None)  # explicit ids win
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 0, None)
  _files(tmp_path, config={}, tokenizer_config={"bos_token": "<nope>"})
  with pytest.raises(DataError, match=r"bos_token='<nope>' is not in") as e:
    HFTokenizer(path)
  with pytest.raises(DataError, match="eos_id=400 is not an id") as e:
    HFTokenizer(path, bos_id=None, eos_id=400, pad_id=None)
  assert "\n" not in str(e.value)


def test_pipeline_wraps_documents_in_the_checkpoint_bos_eos(tmp_path):
  path = _metaspace(tmp_path / "tokenizer.json")
  _files(tmp_path, config={"bos_token_id": 1, "eos_token_id": 2})
  tok = HFTokenizer(str(path))
  docs = (b"the fox", "caf\u00e9 \U0001f642".encode())
  tokens_T, bounds = encode_documents(tok, Corpus(("a", "b"), docs, None))
  for d, doc in enumerate(docs):
    ids = tokens_T[bounds[d] : bounds[d + 1]].tolist()
    assert ids == [1, *tok.encode(doc), 2]


def test_save_load_keeps_a_checked_copy(tmp_path):
  src = tmp_path / "hf"
  src.mkdir()
  path = _byte_level(src / "tokenizer.json")
  _files(src, config={"bos_token_id": 0, "eos_token_id": [0]})
  tok = HFTokenizer(str(path))
  original = path.read_text(encoding="utf-8")
  assert tok.hf_json == original
  (tmp_path / "run").mkdir()
  desc = tmp_path / "run" / "tokenizer.json"
  data_lib.save_tokenizer(tok, desc)
  shutil.rmtree(src)  # the run keeps its own copy and the ids
  recorded = json.loads(desc.read_text())
  assert recorded["kind"] == "huggingface"
  assert (recorded["bos_id"], recorded["eos_id"], recorded["pad_id"]) == (
    0,
    0,
    None,
  )
  back = data_lib.load_tokenizer(desc)
  assert isinstance(back, HFTokenizer) and back.hf_json == original
  assert (back.bos_id, back.eos_id, back.pad_id) == (0, 0, None)
  assert back.encode(TEXT) == tok.encode(TEXT)
  np.testing.assert_array_equal(back.bytes_per_id(), tok.bytes_per_id())
  # The data config still names the deleted file: a run's copy saved from
  # it stands in (what `train` resumes with); any other copy does not.
  data_cfg = DataConfig(tokenizer=str(path))
  kept = data_lib.make_tokenizer(data_cfg, desc)
  assert isinstance(kept, HFTokenizer) and kept.encode(TEXT) == tok.encode(TEXT)
  other = DataConfig(tokenizer=str(tmp_path / "other.json"))
  with pytest.raises(DataError, match="no such Hugging Face tokenizer.json"):
    data_lib.make_tokenizer(other, desc)
  with open(tmp_path / "run" / "hf_tokenizer.json", "a") as f:
    f.write(" ")
  with pytest.raises(DataError, match="sha256 .* differs") as e:
    data_lib.load_tokenizer(desc)
  assert "\n" not in str(e.value)


def _word_piece(path):
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(
    [TRAIN_TEXT],
    trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=["[UNK]"], show_progress=False
    ),
  )
  tok.save(str(path))


def _plain_bpe(path):  # spaces vanish: its bytes per id are not known
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    [TRAIN_TEXT], trainers.BpeTrainer(vocab_size=200, show_progress=False)
  )
  tok.save(str(path))


@pytest.mark.parametrize(
  "write,message",
  [
    (lambda p: p.write_text('{"hello": 1}'), "not a Hugging Face tokenizer"),
    (lambda p: p.write_text("not json"), "not JSON"),
    (
      lambda p: data_lib.save_tokenizer(data_lib.ByteTokenizer(), p),
      "run's tokenizer description",
    ),
    (_word_piece, "model type 'WordPiece'"),
    (_plain_bpe, "neither ByteLevel nor Metaspace"),
    (lambda p: None, "no such Hugging Face tokenizer.json"),
  ],
)
def test_bad_tokenizer_json_is_one_error_line(tmp_path, write, message):
  path = tmp_path / "tokenizer.json"
  write(path)
  with pytest.raises(DataError, match=message) as e:
    data_lib.make_tokenizer(DataConfig(tokenizer=str(path)))
  assert "\n" not in str(e.value)


def _cli(module, *args):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def _flags(corpus, tokenizer, steps):
  return [
    *SMALL_FLAGS,
    "--config.model.num_layers=1",
    "--config.model.vocab_size=512",
    "--config.train.batch_size=4",
    f"--config.train.steps={steps}",
    "--config.checkpoint.every_steps=2",
    "--config.data.source=text",
    f"--config.data.path={corpus}",
    f"--config.data.tokenizer={tokenizer}",
  ]


def test_run_trains_resumes_and_evaluates_on_its_own_copy(tmp_path):
  """A run on a tokenizer.json (ids from the config.json beside it) keeps
  the file; with the original gone, `train` resumes and `evaluate` gives
  bits per byte over the copy's bytes per id."""
  src = tmp_path / "hf"
  src.mkdir()
  path = _metaspace(src / "tokenizer.json")
  _files(src, config={"bos_token_id": 1, "eos_token_id": 2})
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 40, encoding="utf-8")
  workdir = tmp_path / "run"
  bad = tmp_path / "bad.json"
  bad.write_text('{"hello": 1}')
  proc = train_cli(workdir, flags=_flags(corpus, bad, 2), check=False)
  assert proc.returncode != 0
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and "not a Hugging Face tokenizer" in errors[0]
  train_cli(workdir, flags=_flags(corpus, path, 2))
  assert (workdir / "hf_tokenizer.json").read_bytes() == path.read_bytes()
  tok = HFTokenizer(str(path))
  shutil.rmtree(src)
  proc = train_cli(workdir, flags=_flags(corpus, path, 4))
  assert "resumed from step 2" in proc.stderr
  assert "using the run's copy" in proc.stderr
  proc = _cli("efficient_lm.evaluate", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 4 and 0 < result["bpb"] < 20
  # What load_run (evaluate, generate) read: the copy, with the ids.
  run_tok = data_lib.load_tokenizer(workdir / "tokenizer.json")
  assert (run_tok.bos_id, run_tok.eos_id) == (1, 2)
  np.testing.assert_array_equal(run_tok.bytes_per_id(), tok.bytes_per_id())
  # The eval split is the token stream's tail, lines of TEXT: about
  # TEXT's bytes per token (a row's first token is no target).
  per_token = result["num_bytes"] / result["num_tokens"]
  ids = tok.encode(TEXT)
  assert per_token == pytest.approx(len(TEXT.encode()) / len(ids), rel=0.2)
