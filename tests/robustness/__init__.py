"""Robustness suite: broken and hostile inputs through the extractor and the trainer."""
