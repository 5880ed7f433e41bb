"""Run under torchrun with two processes (gloo, CPU): the main process reads a dataset with a bad record inside
``train.distributed.main_first`` (as ``tnlora train`` reads and encodes its data while the others wait); each
rank prints ``rank R: error: <its message>`` and exits 2. The ranks meet once more after printing: a launcher
stops every process as soon as one exits with an error, which could cut rank 1's line short.

    torchrun --nproc_per_node 2 tests/train/main_first_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tnlora.data.readers import load_conversations
from tnlora.errors import TnloraError
from tnlora.train import distributed


def main() -> int:
    distributed.start(30)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bad.json"
        if distributed.is_main():
            data.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}, {"instruction": 3, "output": "x"}]))
        try:
            distributed.main_first(lambda: load_conversations(str(data)), "reading the data")
        except TnloraError as exc:
            # one write for the whole line, as the CLI does: both ranks write to the same pipe at the same time
            sys.stderr.write(f"rank {distributed.rank()}: error: {exc}\n")
            sys.stderr.flush()
            distributed.barrier()
            return 2
    distributed.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
