"""Data: records → conversations (readers) → template (templates) → ids, labels, packed batches (encode).

``inspect.inspect_dataset`` is the report of `tnlora data inspect`. See docs/internals.md for the contracts.
"""
