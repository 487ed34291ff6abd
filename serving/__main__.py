"""``python -m serving NAME ...``: the same as ``zoo serve NAME ...``, without the rest of the ``zoo`` command."""

from __future__ import annotations

import argparse
import sys

from serving import cli


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; 0 when stopped, 2 for a usage error, 1 for a runtime error (one line each)."""
    p = argparse.ArgumentParser(prog="python -m serving", description="Serve zoo models over HTTP (BentoML).")
    cli.add_arguments(p)
    a = p.parse_args(argv)  # argparse's own errors exit with 2
    from zoo.registry import UnknownModelError  # start-up cost: the registry imports torch
    from zoo.store import WeightsCorruptedError  # start-up cost

    try:
        summary = cli.main(a)
    except (UnknownModelError, WeightsCorruptedError, ValueError, OSError) as e:  # as `zoo` reports them
        print(f"serving: error: {e}".replace("\n", " "), file=sys.stderr)
        return cli.exit_status(e)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
