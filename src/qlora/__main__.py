"""``python -m qlora``: the CLI, as torchrun launches it (``torchrun ... -m qlora train``)."""

from qlora.cli import main

raise SystemExit(main())
