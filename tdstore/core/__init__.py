"""Pure logic: names, dtypes, diffs, chunk layout, validation. No I/O, no other layer."""
