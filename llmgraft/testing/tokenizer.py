"""A byte-level BPE tokenizer trained offline on the standard library's source."""

from __future__ import annotations

from pathlib import Path

from .corpus import read_texts, stdlib_files

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(vocab_size: int = 4096, files: list[Path] | None = None):
    """Train a byte-level BPE (GPT-2 style) and wrap it as a ``PreTrainedTokenizerFast``.

    Deterministic for a given file list: the corpus is read in sorted order and the trainer is
    single-pass. ``<|endoftext|>`` (id 0) is BOS, EOS and PAD.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = read_texts(files if files is not None else stdlib_files("train"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
