"""Native TransNormerLLM (placeholder until the model lands)."""


def register_model_classes() -> None:
    """Register TransnormerConfig / TransnormerForCausalLM with transformers' Auto classes."""
