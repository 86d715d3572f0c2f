"""The shard stage and what reads its output: image sources, tar files, the manifest, the training stream."""
