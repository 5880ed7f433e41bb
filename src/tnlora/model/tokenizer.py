"""Tokenizers (placeholder until the data layer lands)."""


def register_tokenizer_classes() -> None:
    """Register the Baichuan tokenizer with AutoTokenizer."""
