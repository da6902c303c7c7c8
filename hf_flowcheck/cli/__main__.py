"""``python -m hf_flowcheck.cli``."""

from hf_flowcheck.cli import main

raise SystemExit(main())
