"""The feature cache: entries and shards on disk, extraction into them, streaming reads."""
