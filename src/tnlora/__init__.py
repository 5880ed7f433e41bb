"""tnlora: LoRA fine-tuning, chat and export for TransNormerLLM.

Importing the package registers the native TransNormerLLM config, model and tokenizer with transformers'
Auto classes, so official checkpoint directories load without ``trust_remote_code``.
"""

from __future__ import annotations

from tnlora.model import register_model_classes
from tnlora.model.tokenizer import register_tokenizer_classes

__version__ = "0.1.0"

register_model_classes()
register_tokenizer_classes()
