#!/usr/bin/env python3
"""Read/write benchmark of tdstore against np.save/np.load, safetensors, diskcache and
memcpy: the same as `tdstore bench`. Run `python tools/bench.py --help`."""

import sys

from tdstore.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
