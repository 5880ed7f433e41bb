"""``python -m tnlora ...``: the ``tnlora`` command (same verbs, output and exit status)."""

from tnlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
