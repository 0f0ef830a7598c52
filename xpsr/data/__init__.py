"""Data: degradations, robust image I/O, LR/HR pairs, the paired dataset."""
