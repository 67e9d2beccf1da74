"""edgefl edge_node."""
