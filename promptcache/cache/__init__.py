"""The cache layer: breakpoint policy, planning, key hashing and the prefix store. Pure Python."""
