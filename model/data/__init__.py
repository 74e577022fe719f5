"""Training data: COCO-format datasets, single-image transforms, cached Mosaic/MixUp, synthetic shapes."""
