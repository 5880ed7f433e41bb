"""`tnlora bench`: training steps and decoding on a preset with random weights, one table row per setting.

``tnlora bench train ...`` (:mod:`tnlora.bench.train`) runs real LoRA training steps through the code of
``tnlora train``; ``tnlora bench decode ...`` (:mod:`tnlora.bench.decode`) times ``generate()``. Each prints
the card, versions and commit first.
"""

from __future__ import annotations

import sys

from tnlora.errors import ConfigError

USAGE = """usage: tnlora bench {train,decode} [options]

  train    LoRA training steps on synthetic data shaped like huanhuan.json (tnlora bench train --help)
  decode   greedy generate() at several batch sizes (tnlora bench decode --help)"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tnlora bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    # Parsed before the bench's module is imported: --help answers without loading torch.
    from tnlora.bench.options import decode_args, train_args

    if verb == "train":
        args, keys = train_args(rest)
        from tnlora.bench.train import run

        return run(args, keys)
    if verb == "decode":
        args = decode_args(rest)
        from tnlora.bench.decode import run as run_decode

        return run_decode(args)
    raise ConfigError(f"unknown bench {verb!r}: choose train or decode (tnlora bench --help)")
