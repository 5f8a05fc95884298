"""Command-line tools of the project (also runnable by path from a checkout)."""
