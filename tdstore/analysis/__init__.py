"""Analysis on top of the store: attention A/B, scoring and null statistics."""
