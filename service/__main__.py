"""`python -m service`: serve with settings from CHARSTREAM_* (the container's entry point)."""

import sys

from service.cli import serve
from service.errors import ServiceConfigError

if __name__ == "__main__":
    try:
        sys.exit(serve())
    except ServiceConfigError as exc:
        print(f"charstream serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
