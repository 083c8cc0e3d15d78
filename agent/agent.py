"""The agent as a script, a drop-in for the old one: `python agent/agent.py` (same as `python -m agent`)."""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, sys.path[0] is agent/ itself, where this file would shadow
    # the `agent` package: put the repository root there instead.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == here:
        sys.path[0] = os.path.dirname(here)
    else:
        sys.path.insert(0, os.path.dirname(here))

from agent.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
