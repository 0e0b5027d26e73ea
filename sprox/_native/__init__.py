"""Compiled hot path; each module has a pure-Python twin."""
