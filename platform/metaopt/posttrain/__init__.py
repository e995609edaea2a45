"""GRPO post-training of language-model policies with self-evolving curricula (pure core; Ray lives in adapters)."""
