"""fedseg."""
