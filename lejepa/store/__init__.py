"""The store: fsspec storage behind URLs, where every file lives, one writer per folder, data errors."""
