"""Data: sources -> tokenizers -> packed, sharded, resumable batches.

tok = make_tokenizer(data_cfg)
it = make_iterator(data_cfg, "train", global_batch_size=B, seed=S,
                   process_index=p, process_count=n, tokenizer=tok)
batch = next(it)            # inputs/targets/segment_ids/positions [B/n, T]
state = it.get_state()      # JSON-serialisable; it.set_state(state)
"""

from efficient_lm.data.errors import DataError
from efficient_lm.data.pipeline import DataIterator, Split, make_iterator
from efficient_lm.data.tokenizers import (
  ByteTokenizer,
  CharTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  load_tokenizer,
  make_tokenizer,
  save_tokenizer,
)

__all__ = [
  "ByteTokenizer",
  "CharTokenizer",
  "DataError",
  "DataIterator",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Split",
  "Tokenizer",
  "load_tokenizer",
  "make_iterator",
  "make_tokenizer",
  "save_tokenizer",
]
