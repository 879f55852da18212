"""``python -m promptcache serve ...``."""

from promptcache.cli import main

raise SystemExit(main())
