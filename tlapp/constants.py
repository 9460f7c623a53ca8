"""Constants shared by several modules; pure Python, so the CLI can use them without TensorFlow."""

# Images with more pixels are skipped (decompression bombs); --max-pixels changes it.
DEFAULT_MAX_PIXELS = 200_000_000

SPLITS = ("train", "val", "test")

# Test-time augmentation modes (tlapp.inference.predict describes their geometry).
TTA_MODES = ("none", "flip", "10crop")

# Decoded by content, whatever the extension says; matched without regard to case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp")
