"""Other engines lowbit's exports are checked by and measured against (optional extras)."""
