"""Task-specific steps around the network (e.g. the portrait-drawing face crop)."""
