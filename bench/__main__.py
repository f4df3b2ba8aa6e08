"""``python -m attn_zoo.bench``: the same CLI as the ``bench`` and ``attn-zoo`` scripts."""

from attn_zoo.bench.cli import main

raise SystemExit(main())
