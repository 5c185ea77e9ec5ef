"""`python -m csm_voice_api ...` is the `csm-voice-api` console script."""

from __future__ import annotations

from csm_voice_api.cli import main

raise SystemExit(main())
