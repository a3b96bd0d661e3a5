"""The watch registry (pure core) of the watch broadcaster; see core.py."""
