#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the local server answers /v2/health/ready with 200.

The runtime image has no curl or wget, and should not get them for this; the
stdlib does the request. It asks 127.0.0.1 on BNFOLD_PORT (default 8000), the
port `bnfold serve` reads, so a container started with another BNFOLD_PORT
stays healthy. Any other outcome (refused, timeout, 503 while the repository
loads) exits 1 with the reason on stderr, which `docker inspect` shows.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def ready_url(environ: dict[str, str]) -> str:
    return f"http://127.0.0.1:{environ.get('BNFOLD_PORT', '8000')}/v2/health/ready"


def main() -> int:
    url = ready_url(dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
