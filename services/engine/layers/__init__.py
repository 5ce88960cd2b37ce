"""Model building blocks, one op per file."""
