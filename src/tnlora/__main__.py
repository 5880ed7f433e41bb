"""``python -m tnlora`` is the ``tnlora`` command."""

from tnlora.cli import main

raise SystemExit(main())
