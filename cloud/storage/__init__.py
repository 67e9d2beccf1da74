"""Where the cloud keeps what the fleet reports."""
