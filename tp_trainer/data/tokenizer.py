"""Train a small, real Hugging Face fast tokenizer locally (no downloads).

The tokenizer is a byte-level BPE (GPT-2 style, so any text round-trips exactly,
including newlines of the prompt template) whose pre-tokenizer first splits every
digit into its own piece. Numbers are therefore always encoded digit by digit,
which keeps arithmetic tasks learnable.

Tensor parallelism shards the embedding / LM-head along the vocabulary, so
:func:`build_tokenizer` pads ``len(tokenizer)`` up to a multiple of
``pad_to_multiple_of`` (default 8) with filler special tokens named
``<|filler_0|>``, ``<|filler_1|>``, ... They are never produced by encoding
ordinary text and are removed by ``decode(..., skip_special_tokens=True)``.
Use ``len(tokenizer)`` (not ``tokenizer.vocab_size``, which excludes added
tokens) as the model's ``vocab_size``.
"""

from __future__ import annotations

from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["build_tokenizer", "BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN"]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
_FILLER_TEMPLATE = "<|filler_{}|>"
# 256 byte-level symbols + the four special tokens must fit in the vocabulary.
_MIN_VOCAB_SIZE = 256 + 4


def build_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    model_max_length: int = 512,
    min_frequency: int = 2,
    pad_to_multiple_of: Optional[int] = 8,
    add_bos_token: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with single-digit splitting on ``texts``.

    Args:
        texts: Training corpus (e.g. formatted SFT prompts + responses). Consumed once.
        vocab_size: Target BPE vocabulary size including the special tokens (``>= 260``).
            A small corpus may yield fewer tokens than requested.
        model_max_length: Stored on the tokenizer (and in its saved config).
        min_frequency: Minimum pair frequency for a BPE merge.
        pad_to_multiple_of: If set, add filler special tokens until ``len(tokenizer)``
            is a multiple of it (needed to shard the vocabulary across tensor-parallel
            ranks). ``None`` disables padding.
        add_bos_token: Prepend ``<s>`` when encoding with ``add_special_tokens=True``
            (the default of ``tokenizer(...)``). EOS is never appended automatically;
            SFT code appends it to the response explicitly.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``bos_token="<s>"``, ``eos_token="</s>"``,
        ``pad_token="<pad>"``, ``unk_token="<unk>"`` (ids 1, 2, 3, 0), right padding.
        It can be saved with ``save_pretrained`` and reloaded offline with
        ``AutoTokenizer.from_pretrained(path)``.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: byte-level BPE needs at least "
            f"{_MIN_VOCAB_SIZE} (256 bytes + 4 special tokens). Use e.g. vocab_size=1024."
        )
    if pad_to_multiple_of is not None and (
        not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise ValueError(
            f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}."
        )

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = {"n": 0}

    def _iter():
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(
                    f"build_tokenizer expects an iterable of str; item {counter['n']} is "
                    f"{type(text).__name__}."
                )
            counter["n"] += 1
            yield text

    tok.train_from_iterator(_iter(), trainer=trainer)
    if counter["n"] == 0:
        raise ValueError("build_tokenizer got no training texts; pass a non-empty iterable of str.")

    if add_bos_token:
        bos_id = tok.token_to_id(BOS_TOKEN)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )

    n_fillers = 0
    if pad_to_multiple_of:
        n_fillers = -tok.get_vocab_size(with_added_tokens=True) % pad_to_multiple_of
        if n_fillers:
            tok.add_special_tokens([_FILLER_TEMPLATE.format(i) for i in range(n_fillers)])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    if pad_to_multiple_of and len(hf_tok) % pad_to_multiple_of:
        raise RuntimeError(  # pragma: no cover - guards against upstream behaviour changes
            f"Tokenizer length {len(hf_tok)} is not a multiple of {pad_to_multiple_of}."
        )
    logger.info(
        "Trained byte-level BPE tokenizer on %d texts: %d tokens (%d filler tokens added).",
        counter["n"], len(hf_tok), n_fillers,
    )
    return hf_tok
