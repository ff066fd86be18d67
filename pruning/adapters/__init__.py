"""actprune."""
