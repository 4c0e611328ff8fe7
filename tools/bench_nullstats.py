#!/usr/bin/env python3
"""A null-stats cache hit vs diskcache.Cache.get (the same as `tdstore bench-nullstats`)."""

import sys

from tdstore.cli import main

if __name__ == "__main__":
    main(["bench-nullstats", *sys.argv[1:]])
