"""Language-model policies: tiny causal LMs built from a config, or a local pretrained directory.

No weights are downloaded: a policy is either built from a ``transformers`` config with a seeded random
initialisation (Qwen2 or GPT-2 architecture, the character tokenizer of :mod:`.tokenizer`), or loaded from a
directory written by ``save_pretrained``, with its own tokenizer (``AutoTokenizer``, local files only) and, where
the tokenizer has one, its chat template (:func:`prompt_renderer`). Dropout is off in built policies so that the
GRPO ratio π_θ/π_θold is exactly 1 before the first update (Shao et al. 2024, Eq. 3) and sampling is
deterministic given the seed.

:func:`get_weights` / :func:`set_weights` move a plain ``state_dict`` of CPU tensors, which is what the
learner sends to rollout workers after each update.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from metaopt.errors import ConfigError
from metaopt.posttrain.tasks import format_prompt
from metaopt.posttrain.tokenizer import build_char_tokenizer, load_tokenizer

__all__ = [
    "ARCHITECTURES",
    "build_tiny_policy",
    "get_weights",
    "load_policy",
    "load_prompt_renderer",
    "make_policy",
    "prompt_renderer",
    "set_weights",
]

ARCHITECTURES = ("qwen2", "gpt2")
MODEL_KEYS = ("path", "arch", "hidden", "layers", "heads", "max_positions", "chat_template")
_MODEL_DEFAULTS: dict[str, Any] = {
    "path": None,
    "chat_template": "auto",
    "arch": "qwen2",
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "max_positions": 128,
}


def _check_positive(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def _config(
    arch: str, vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int, token_ids: dict[str, int]
) -> Qwen2Config | GPT2Config:
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            use_cache=True,
            **token_ids,
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=True,
        **token_ids,
    )


def build_tiny_policy(
    arch: str,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    max_positions: int,
    seed: int,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> PreTrainedModel:
    """A randomly initialised ``Qwen2ForCausalLM`` (``"qwen2"``) or ``GPT2LMHeadModel`` (``"gpt2"``).

    Initialisation draws from a private RNG seeded with ``seed``: the global torch RNG is left untouched, and
    the same arguments give the same weights.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError("posttrain.model.arch", f"must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    for field, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("max_positions", max_positions)):
        _check_positive(f"posttrain.model.{field}", value)
    if hidden % heads:
        raise ConfigError("posttrain.model.heads", f"must divide hidden ({hidden} % {heads} != 0)")
    if arch == "qwen2" and (hidden // heads) % 2:
        raise ConfigError(
            "posttrain.model.heads", f"hidden/heads must be even for rotary embeddings, got {hidden // heads}"
        )
    token_ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    config = _config(arch, vocab_size, hidden, layers, heads, max_positions, token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Qwen2ForCausalLM if arch == "qwen2" else GPT2LMHeadModel)(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    return model


def load_policy(path: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer from the local directory ``path`` (``save_pretrained`` output; never the hub)."""
    if not Path(path).is_dir():
        raise ConfigError("posttrain.model.path", f"{path!r} does not exist or is not a directory")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except OSError as err:  # a directory without config/weights: one line, not a traceback from the hub client
        raise ConfigError("posttrain.model.path", f"{path!r} holds no loadable causal LM ({err})") from None
    if tokenizer.pad_token_id is None:  # many LM tokenizers have none; left-padded batches need one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def make_policy(model_spec: dict[str, Any], seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The policy a run starts from: ``model_spec["path"]`` if set, else a tiny policy over characters.

    ``model_spec`` keys (defaults): ``path`` None, ``arch`` "qwen2", ``hidden`` 64, ``layers`` 2, ``heads`` 4,
    ``max_positions`` 128, ``chat_template`` "auto"; the size keys are ignored when ``path`` is set.
    """
    unknown = sorted(set(model_spec) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"posttrain.model.{unknown[0]}", f"unknown key; allowed: {', '.join(MODEL_KEYS)}")
    spec = {**_MODEL_DEFAULTS, **model_spec}
    if spec["path"] is not None:
        return load_policy(str(spec["path"]))
    tokenizer = build_char_tokenizer()
    model = build_tiny_policy(
        spec["arch"],
        vocab_size=len(tokenizer),
        hidden=spec["hidden"],
        layers=spec["layers"],
        heads=spec["heads"],
        max_positions=spec["max_positions"],
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model, tokenizer


def prompt_renderer(tokenizer: PreTrainedTokenizerBase, chat_template: bool | str = "auto") -> Callable[[str], str]:
    """How a question becomes the prompt text: one user turn of the tokenizer's own chat template
    (``apply_chat_template`` with the generation prompt) when ``chat_template`` is True, or "auto" and the
    tokenizer has a template; else the plain ``Q:<question> A:`` of :func:`metaopt.posttrain.tasks.format_prompt`.
    True without a template is one ConfigError on ``posttrain.model.chat_template``."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has_template:
        raise ConfigError("posttrain.model.chat_template", "is true but the model's tokenizer has no chat template")
    if chat_template is False or not has_template:
        return format_prompt
    return _ChatPrompt(tokenizer)


class _ChatPrompt:
    """A question as one user turn of ``tokenizer``'s chat template, ending where the assistant's answer starts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_prompt_renderer(model_spec: dict[str, Any]) -> Callable[[str], str]:
    """:func:`prompt_renderer` for ``model_spec`` without loading the model: the plain prompt for a policy built from
    a config (our character tokenizer has no template), the local tokenizer's template otherwise."""
    spec = {**_MODEL_DEFAULTS, **model_spec}
    if spec["path"] is None:
        if spec["chat_template"] is True:
            raise ConfigError("posttrain.model.chat_template", "needs model.path (a local model with a chat template)")
        return format_prompt
    return prompt_renderer(load_tokenizer(str(spec["path"])), spec["chat_template"])


def get_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (safe to send to another process and to keep)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def set_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (from :func:`get_weights`) into ``model`` in place; every key must match."""
    model.load_state_dict(weights, strict=True)
