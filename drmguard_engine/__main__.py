"""``python -m drmguard_engine`` runs the engine CLI."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
