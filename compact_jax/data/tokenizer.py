"""SentencePiece tokenizers: trained on a record set's text, or loaded from a file.

The tiny world trains its own small model during ``build`` (no downloads); real
runs point ``config.build.tokenizer_file`` at the LM's own ``.model`` (Gemma,
LLaMA). Chat-template control strings are registered as user-defined symbols
when we train, so each is one token and can never be split or merged with text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sentencepiece as spm

# Ids fixed at training time so padding is always 0 (batches are zero-padded).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class Tokenizer:
  """A loaded SentencePiece model with the ids the pipeline needs."""

  path: str
  sp: spm.SentencePieceProcessor

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"Tokenizer model {path!r} does not exist; run the build stage first")
    sp = spm.SentencePieceProcessor()
    if not sp.Load(path):
      raise ValueError(f"Could not load SentencePiece model {path!r}")
    return cls(path=path, sp=sp)

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  @property
  def pad_id(self) -> int:
    # LLaMA's models have no pad piece (pad_id -1); we pad with 0 then, which
    # is <unk> there and is never attended to nor trained on.
    return max(self.sp.pad_id(), 0)

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])

  def single_id(self, piece: str) -> int | None:
    """The id of ``piece`` if it is one token of this vocabulary, else None."""
    ids = self.sp.EncodeAsIds(piece)
    pid = self.sp.PieceToId(piece)
    if pid != self.sp.unk_id() and self.sp.IdToPiece(pid) == piece:
      return pid
    return ids[0] if len(ids) == 1 else None


def train_tokenizer(
  texts: Iterable[str],
  path: str | os.PathLike,
  *,
  vocab_size: int,
  model_type: str = "bpe",
  control_symbols: Sequence[str] = (),
) -> Tokenizer:
  """Trains a SentencePiece model on ``texts`` and writes it to ``path``.

  Deterministic for a given text order (one thread, no sampling of the input).
  ``vocab_size`` is an upper bound: a small corpus gets the vocabulary it
  supports instead of failing.
  """
  path = os.fspath(path)
  model = io.BytesIO()
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("Cannot train a tokenizer: the records contain no text")
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter(texts),
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    hard_vocab_limit=False,
    character_coverage=1.0,
    byte_fallback=False,
    split_digits=True,
    # Segments are tokenized one by one (see template.py); a dummy prefix
    # space per segment would add a token to every turn boundary.
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    user_defined_symbols=list(control_symbols),
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
  )
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return Tokenizer.load(path)
