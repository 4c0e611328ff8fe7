#!/usr/bin/env python3
"""Dense vs sparse attention: time and peak memory (the same as `tdstore bench-attention`)."""

import sys

from tdstore.cli import main

if __name__ == "__main__":
    main(["bench-attention", *sys.argv[1:]])
