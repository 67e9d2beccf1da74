"""edgefl cloud."""
