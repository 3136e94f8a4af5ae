"""The ``prunekit`` console script. Kept import-light so a Ctrl-C while the heavy modules load is a clean exit 130."""

import sys


def main() -> None:
    try:
        from prunekit.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    cli_main()
