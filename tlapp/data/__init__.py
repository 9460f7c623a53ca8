"""Image data: folder scan and split, validation, the one decoder, TFDS, tf.data readers."""
