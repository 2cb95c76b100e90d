"""``python -m l2o.suite [--suite heldout] [--tasks a,b] [--refresh]``: precompute and cache the
tuned baselines of a held-out suite (``$L2O_CACHE_DIR``, default ``~/.cache/l2o``)."""

from __future__ import annotations

import argparse
import sys

from l2o.suite.evaluate import precompute_baselines


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and precompute the baselines; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m l2o.suite", description=__doc__)
    parser.add_argument("--suite", default="heldout", help="suite name (default: heldout)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("--refresh", action="store_true", help="recompute even what is cached")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.tasks or "").split(",") if n.strip()] or None
    try:
        precompute_baselines(args.suite, tasks=names, refresh=args.refresh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
