"""Export a gptjax SentencePiece tokenizer as a Hugging Face `tokenizers` tokenizer with the same ids.

to_hf_tokenizer(tok) rebuilds the SentencePiece BPE model of a gptjax Tokenizer in `tokenizers`, so
that encode(text, add_special_tokens=False).ids equals tok.encode(text); save_pretrained(tok, folder)
writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, which
transformers.AutoTokenizer.from_pretrained(folder) and gptjax's HFTokenizer.load(folder) read with
those same ids.

How SentencePiece's encoding is reproduced:
  - Every piece keeps its id: pad, unk, eos and the control symbols <start>, <delim>, <extract> at
    0-5 become special tokens, the 256 "<0x..>" byte pieces follow, then the learned pieces.
  - SentencePiece BPE merges the adjacent pair whose concatenation is the best-scoring piece in the
    vocabulary, whichever way that piece splits. A `tokenizers` BPE model ranks explicit pairs, so
    every split of every normal piece into two normal pieces becomes a merge, ranked by the score
    of the piece it makes.
  - Text is one word, as in SentencePiece (no whitespace pre-tokenization): spaces become "▁" and
    one "▁" is prepended to the whole text, also when the text already starts with a space or a
    literal "▁" (SentencePiece then yields "▁▁...", and so does this).
  - Characters outside the vocabulary are spelled as their UTF-8 byte pieces (byte fallback), so
    <unk> does not come from text.
  - No special token comes from text: a literal "<start>" or "</s>" is encoded as ordinary pieces.
    That is the `encode_special_tokens` switch of `tokenizers`, which is not part of tokenizer.json:
    to_hf_tokenizer() sets it on the object it returns, save_pretrained() records it as
    split_special_tokens in tokenizer_config.json (AutoTokenizer honours that), but a bare
    tokenizer.json loaded with tokenizers.Tokenizer.from_file matches special tokens in text again.

Known differences:
  - Ties: when one piece can be made at two overlapping places at once ("X Y Z" with X+Y == Y+Z),
    SentencePiece merges the left pair and `tokenizers` the pair whose split ranks first. Exhaustive
    comparisons over small random vocabularies found no text whose ids this changes.
  - decode of ids that encode never produces but a model can sample: SentencePiece drops control
    pieces and shows unk as " ⁇ ", while `tokenizers` drops every special token, unk included, with
    skip_special_tokens=True (the default of tokenizers.Tokenizer.decode, not of AutoTokenizer's)
    and otherwise shows each as its own text; in a run of byte pieces that is not valid UTF-8,
    SentencePiece turns only the invalid bytes into U+FFFD and `tokenizers` every byte of the run;
    a leading "<0x20>" byte piece loses its space as a leading "▁" does.
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import AddedToken, decoders, normalizers
from tokenizers.models import BPE

from gptjax.data.hf_tokenizer import write_pretrained
from gptjax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from gptjax.errors import UserError

SPACE = "\u2581"
# Values of sentencepiece_model.proto's ModelProto.SentencePiece.Type and TrainerSpec.ModelType.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
_BPE = 2


def _model_proto(tok: Tokenizer):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise UserError(f"reading a SentencePiece model's pieces and settings needs the protobuf package ({e}); "
                        "install it with `pip install protobuf`") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.serialized_model_proto())
    return proto


def _check_supported(proto) -> None:
    """Refuse models whose encoding the pipeline built here would not reproduce id for id."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != _BPE:
        problems.append(f"model_type {trainer.model_type} is not BPE")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if norm.precompiled_charsmap or proto.denormalizer_spec.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} is not 'identity'")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if not norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if {p.type for p in proto.pieces} & {_USER_DEFINED, _UNUSED}:
        problems.append("it has user-defined or unused pieces")
    # SentencePiece merges a character it has no piece for into longer pieces that contain it;
    # `tokenizers` spells such a character as bytes at once. Trained models have a piece for
    # every character of every piece, so only an edited model can trip this.
    normal = {p.piece for p in proto.pieces if p.type == _NORMAL}
    orphans = sorted({c for piece in normal for c in piece} - normal)
    if orphans:
        problems.append(f"characters {''.join(orphans[:10])!r} occur in pieces but are not pieces themselves")
    if problems:
        raise UserError("cannot export this SentencePiece model to a Hugging Face tokenizer with the same ids: "
                        + "; ".join(problems) + "; export models trained with gptjax's train_tokenizer")


def _merges(proto) -> list[tuple[str, str]]:
    # Only normal pieces take part in merging: SentencePiece never merges byte, control or unknown
    # pieces, and never builds them from text.
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def to_hf_tokenizer(tok: Tokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers` tokenizer giving tok.encode(text)'s ids for any text (add_special_tokens=False)."""
    proto = _model_proto(tok)
    _check_supported(proto)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[UNK_ID].piece
    hf = tokenizers.Tokenizer(BPE(vocab=vocab, merges=_merges(proto), unk_token=unk, byte_fallback=True,
                                  fuse_unk=True, dropout=None))
    # A Metaspace pre-tokenizer would skip the prefix for text that already starts with a space or
    # "▁", where SentencePiece still prepends one; as normalizers both steps apply unconditionally.
    hf.normalizer = normalizers.Sequence([normalizers.Replace(" ", SPACE), normalizers.Prepend(SPACE)])
    # Fuse before Strip so that only the very first character loses its space, not every token.
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    # Pieces already in the vocabulary keep their ids when registered as special tokens.
    hf.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    hf.encode_special_tokens = True
    return hf


def save_pretrained(tok: Tokenizer, folder: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    hf = to_hf_tokenizer(tok)
    piece = hf.id_to_token
    write_pretrained(hf, folder, eos_token=piece(EOS_ID), unk_token=piece(UNK_ID), pad_token=piece(PAD_ID))