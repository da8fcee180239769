"""Command line: `python -m card_jax.report --runs=DIR [DIR ...] --out=REPORT_DIR`.

Reads every run and deck under the --runs folders (see `collect.py`), writes the report into
--out, prints the path of report.md and a one-line summary. Exit 2 on bad arguments or when no
usable run or deck is found; unusable results files are warned about and skipped.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from card_jax.report import collect, document


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, not argparse's usage block: the message is what matters in a sweep log.
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m card_jax.report",
                     description="Tables and the paper's figures from finished card_jax runs.")
    parser.add_argument("--runs", action="extend", nargs="+", required=True, metavar="DIR",
                        help="folders searched recursively for runs and decks (repeatable, "
                             "space- or comma-separated)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="report folder (created with its parents)")
    parser.add_argument("--title", default="card_jax report", help="title of report.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the report; returns the exit code (0, or 2 when nothing usable was found)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    roots = [part for item in args.runs for part in item.split(",") if part]
    if not roots:
        _parser().error("--runs needs at least one folder")
    found = collect.collect(roots)
    if not found.runs and not found.decks:
        print(f"error: no usable results.json under {', '.join(roots)}"
              + (f" ({len(found.skipped)} skipped, see warnings)" if found.skipped else ""),
              file=sys.stderr)
        return 2
    command = "python -m card_jax.report " + shlex.join(argv)
    summary = document.write_report(found, args.out, args.title, command)
    print(f"{args.out.rstrip('/')}/{document.REPORT_MD}")
    print(f"{len(summary['runs'])} run(s), {len(summary['decks'])} deck(s), "
          f"{len(summary['skipped'])} skipped, {len(summary['figures'])} figure(s), "
          f"{len(summary['notes'])} note(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
