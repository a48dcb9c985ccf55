"""A byte-level BPE tokenizer trained on a small text corpus: the stand-in VLM's and the tiny test VLMs'.

No tokenizer can be downloaded offline, so the models MedQM builds itself train theirs (Hugging Face
`tokenizers`, the byte-level pre-tokenizer GPT-2 and Llama 3 use: every string is encodable).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """A `tokenizers.Tokenizer` (byte-level BPE) trained on ``corpus``, with ``special_tokens`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


__all__ = ["train_bpe_tokenizer"]
