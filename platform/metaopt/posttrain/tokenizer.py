"""A character-level tokenizer built locally with the ``tokenizers`` library (nothing is downloaded).

Every character of the alphabet is one token, so a tiny policy learns arithmetic digit by digit, and
``decode(encode(s)) == s`` for any string over the alphabet (no spaces are inserted between characters and no
clean-up of spaces around punctuation is applied). Four special tokens come first: ``<pad>`` (id 0), ``<bos>``,
``<eos>``, ``<unk>``; characters outside the alphabet encode to ``<unk>``. No special token is added on encode:
prompts are plain text and a completion ends with ``<eos>``, which the sampler appends and stops on.

The result is a :class:`transformers.PreTrainedTokenizerFast` with left padding (generation pads prompts on the
left), so it saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` — TRL's
``GRPOTrainer`` accepts it as ``processing_class``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from metaopt.errors import ConfigError

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "build_char_tokenizer", "load_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Digits first (the tasks' answers), then letters, space, ASCII punctuation and newline: everything the task
# prompts (including reasoning-gym's short forms) use.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " " + string.punctuation + "\n"


def _vocabulary(alphabet: str) -> dict[str, int]:
    characters = list(dict.fromkeys(alphabet))  # keep the first occurrence, in order
    clash = [c for c in characters if c in SPECIAL_TOKENS]
    if clash:
        raise ConfigError("tokenizer.alphabet", f"characters {clash} clash with special tokens")
    return {token: i for i, token in enumerate((*SPECIAL_TOKENS, *characters))}


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over ``alphabet`` (default :data:`DEFAULT_ALPHABET`)."""
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    if not alphabet:
        raise ConfigError("tokenizer.alphabet", "must contain at least one character")
    backend = Tokenizer(models.WordLevel(_vocabulary(alphabet), unk_token="<unk>"))
    # One piece per character, newline included ([\s\S] matches every character).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, never join with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


#: ``tokenizer_class`` values of a tokenizer saved from a plain ``tokenizer.json`` (ours, or any built in code).
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def saved_tokenizer_class(path: str | Path) -> str | None:
    """The ``tokenizer_class`` written in ``path/tokenizer_config.json`` (None when absent or unreadable)."""
    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer saved in the local directory ``path`` (never the Hugging Face hub), padding on the left, chat
    template included. A model's own tokenizer class comes through ``AutoTokenizer``; a generic one (a plain
    ``tokenizer.json``, like our character tokenizer) is loaded as saved: ``AutoTokenizer`` would pick the class
    of the model's architecture, whose own pre-tokenizer then replaces the saved one (newlines would be lost)."""
    if not Path(path).is_dir():
        raise ConfigError("posttrain.model.path", f"{path!r} does not exist or is not a directory")
    if saved_tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer
