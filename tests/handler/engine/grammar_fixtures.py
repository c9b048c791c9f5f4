"""A byte-level BPE tokenizer.json for the tiny engine models, so llguidance can run grammars
over their vocabulary: ids 0-3 are specials (EOS is engine_fixtures.EOS_ID), then the 256 byte
tokens and a few merges. It lists fewer ids than the model's vocabulary, like a padded embedding:
the ids past it must never be allowed by a grammar."""

from __future__ import annotations

from pathlib import Path

from tests.support.engine_fixtures import EOS_ID

SPECIALS = ["<pad>", "<bos>", "<unk>", "<eos>"]
MERGES = [("t", "r"), ("tr", "u"), ("tru", "e"), ("f", "a"), ("fa", "l"), ('"', ":")]


def write_byte_tokenizer(path: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    assert SPECIALS.index("<eos>") == EOS_ID
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tokenizer.save(str(path))
    return path


def decode(path: Path, ids: list[int]) -> str:
    """Text of ids (EOS dropped), by the tokenizers package itself."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).decode([i for i in ids if i != EOS_ID])
