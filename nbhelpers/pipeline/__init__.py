"""The image pipeline: mitigations as pure functions, preprocessing, the image cache, lung fields in training geometry, batches."""
