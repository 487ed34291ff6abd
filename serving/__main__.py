"""``python -m serving NAME ...``: the same as ``zoo serve NAME ...``, without the rest of the ``zoo`` command."""

from __future__ import annotations

import argparse
import sys

from serving import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving", description="Serve zoo models over HTTP (BentoML).")
    cli.add_arguments(p)
    a = p.parse_args(argv)
    from zoo.registry import UnknownModelError
    from zoo.store import WeightsCorruptedError

    try:
        summary = cli.main(a)
    except (UnknownModelError, WeightsCorruptedError, ValueError, OSError) as e:  # as `zoo` reports them
        print(f"serving: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
