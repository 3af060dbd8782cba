"""fl_protocol."""
