"""tnlora: LoRA fine-tuning, chat and export for TransNormerLLM.

Importing ``tnlora.model`` (which every model-loading path does) registers the native TransNormerLLM config,
model and tokenizer with transformers' Auto classes, so official checkpoint directories load without
``trust_remote_code``. The package itself imports nothing heavy: ``tnlora --help`` must not load torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
