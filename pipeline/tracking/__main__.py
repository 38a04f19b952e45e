"""`python -m pipeline.tracking report|sync|close-stale ...` (see pipeline/tracking/cli.py)."""

from pipeline.tracking.cli import main

if __name__ == "__main__":
    main()
