"""Train a small, real Hugging Face fast tokenizer locally (no downloads).

The tokenizer is a byte-level BPE (GPT-2 style, so any text round-trips exactly,
including newlines of the prompt template) whose pre-tokenizer first splits every
digit into its own piece. Numbers are therefore always encoded digit by digit,
which keeps arithmetic tasks learnable.

Two options shape it for small models trained on templated data:

* ``whole_tokens``: strings (e.g. the fixed pieces of the Alpaca prompt template)
  that are encoded as ONE token each wherever they occur, like the role markers of
  chat tokenizers. The ~30-token Alpaca boilerplate becomes 1 token: a generated task
  record is ~26 tokens instead of ~62, and a training step costs accordingly less.
* ``isolate_words``: pre-tokenize into runs of letters, single digits, runs of
  punctuation with at most one following space (``", "``, ``": "``) and single
  whitespace characters, instead of GPT-2's ``" word"`` pieces. A word or a letter is
  then the same token at the start of a line, after a space and at the start of a
  response (``"d e r"`` is ``d``, ``Ġ``, ``e``, ``Ġ``, ``r``), so copying, reversing and
  looking up move identical tokens instead of learning ``"Ġx" -> "x"`` pairs.

Tensor parallelism shards the embedding / LM-head along the vocabulary, so
:func:`build_tokenizer` pads ``len(tokenizer)`` up to a multiple of
``pad_to_multiple_of`` (default 8) with filler special tokens named
``<|filler_0|>``, ``<|filler_1|>``, ... They are never produced by encoding
ordinary text and are removed by ``decode(..., skip_special_tokens=True)``.
Use ``len(tokenizer)`` (not ``tokenizer.vocab_size``, which excludes added
tokens) as the model's ``vocab_size``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
    whole_tokens: Sequence[str] = (),
    isolate_words: bool = False,
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
        whole_tokens: Non-empty strings each encoded as a single (non-special) token
            wherever it occurs; they are cut out of the BPE training texts, so the merges
            are spent on the rest. Decoding (also with ``skip_special_tokens=True``)
            gives them back verbatim, so text still round-trips exactly. Longer strings
            win where two overlap.
        isolate_words: Pre-tokenize into letter runs, single digits, punctuation runs with
            at most one trailing space, and single whitespace characters (no BPE token then
            glues a space to a word, e.g. ``"Ġcat"``). Default: GPT-2's pre-tokenization.

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

    whole_tokens = list(whole_tokens)
    if any(not isinstance(w, str) or not w for w in whole_tokens):
        raise ValueError(f"whole_tokens must be non-empty strings, got {whole_tokens!r}.")
    # Longest first (cutting a string out of the training texts must not break a longer one), ties by text: the
    # token ids never depend on the order given or on hash randomisation.
    whole_tokens = sorted(set(whole_tokens), key=lambda w: (-len(w), w))

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    pieces = [pre_tokenizers.Digits(individual_digits=True)]
    if isolate_words:
        pieces += [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+ ?|\s"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    else:
        pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces)
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
            for whole in whole_tokens:  # the added tokens below encode these; BPE never sees them
                text = text.replace(whole, "\n")
            yield text

    tok.train_from_iterator(_iter(), trainer=trainer)
    if counter["n"] == 0:
        raise ValueError("build_tokenizer got no training texts; pass a non-empty iterable of str.")

    if whole_tokens:
        tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in whole_tokens])

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
        "Trained byte-level BPE tokenizer on %d texts: %d tokens (%d whole-string tokens, %d filler tokens).",
        counter["n"], len(hf_tok), len(whole_tokens), n_fillers,
    )
    return hf_tok
