"""Model building blocks, one small module each."""
