"""The shapes world: a captioned world of coloured shapes, and the small text-to-image model trained on it."""
