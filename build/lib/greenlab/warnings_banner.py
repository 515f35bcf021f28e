"""A warning nobody can miss: for silent fallbacks such as random initialisation."""

import logging
import sys

log = logging.getLogger("greenlab")


def loud_warning(message: str) -> None:
    """Log ``message`` at WARNING level and print it inside a banner on stderr."""
    bar = "!" * 78
    log.warning(message)
    print(
        f"\n{bar}\n!! greenlab WARNING\n!! " + message.replace("\n", "\n!! ") + f"\n{bar}\n", file=sys.stderr
    )
