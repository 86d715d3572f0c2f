"""`DataError`: the one error for data a user can fix, raised wherever data is read.

ConfigError lives with the config and StorageError with the storage layer, each beside the one module that
raises it. A data problem has no such home: sources (a missing path, no images), the tar reader (a corrupt
or truncated shard), the manifest (none committed), the loaders (a shard that differs from its manifest) and
the release reader (a file that differs from its `release.json`) all raise it, so it has a module of its own.
"""


class DataError(ValueError):
    """A data problem a user can fix (missing path, no images, no manifest); the message names it."""
