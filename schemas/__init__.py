"""edgefl schemas."""
