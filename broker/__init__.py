"""edgefl broker."""
