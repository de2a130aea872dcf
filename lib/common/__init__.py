"""Parts both papers share: data and folders of images, corruptions, backbones, metrics, caches, the registry of
names, seeding and atomic file writes."""
