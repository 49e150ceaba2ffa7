"""``python -m tokensieve.integrations.lmms_eval``: print the tasks folder for
``--include_path`` (``--data`` also writes the scene-QA data sets and prints their files)."""

from __future__ import annotations

import sys

from tokensieve.integrations.lmms_eval import tasks_dir


def main(argv: list[str] | None = None) -> int:
    """Print the tasks folder; with ``--data``, write (if missing) and print the data files."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--data":
        from tokensieve.integrations.lmms_eval.scene_qa import SIZES, write_dataset

        for n in SIZES.values():
            print(write_dataset(n))
        return 0
    if args:
        print(f"unknown arguments {args}; usage: python -m tokensieve.integrations.lmms_eval "
              "[--data]", file=sys.stderr)
        return 2
    print(tasks_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
