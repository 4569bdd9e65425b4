"""One adapter per backbone family: how to load it, encode its conditioning, call it, and export it."""
