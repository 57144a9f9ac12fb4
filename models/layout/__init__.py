"""Layout and subjects: the region layout, subject references, and their previews."""
