"""Token strategies: which patch tokens of each online view the student encodes."""
