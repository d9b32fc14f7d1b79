"""`python -m service`: serve with settings from CHARSTREAM_* (the container's entry point)."""

import sys

from service.errors import ServiceConfigError
from service.server import serve

if __name__ == "__main__":
    try:
        sys.exit(serve())
    except ServiceConfigError as exc:
        print(f"charstream serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
