"""Byte-level BPE tokenizer for the demo model, trained with the `tokenizers` library.

The trainer sees a corpus sample plus every string of `corpus.required_tokens()` repeated, so that
answers, names and small numbers all become single tokens. The result is a `PreTrainedTokenizerFast`
that prepends a BOS token to every sequence.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(
    texts: Iterable[str], required: list[str], vocab_size: int = 4096, repeats: int = 40
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with `required` strings boosted to be single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Words with a leading space only survive pre-tokenization as " word" after a preceding char.
    boost_text = "".join(("x" if w.startswith(" ") else '"') + w + "\n" for w in required)

    def stream() -> Iterable[str]:
        yield from texts
        for _ in range(repeats):
            yield boost_text

    tok.train_from_iterator(stream(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    return fast


def single_token_id(tokenizer: PreTrainedTokenizerFast, s: str) -> int | None:
    """The id of `s` if it encodes to exactly one token (without BOS), else None."""
    ids = tokenizer.encode(s, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
