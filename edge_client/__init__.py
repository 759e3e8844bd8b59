"""fedsb."""
