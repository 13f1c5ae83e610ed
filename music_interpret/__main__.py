"""``python -m music_interpret``."""

from .cli import main

raise SystemExit(main())
