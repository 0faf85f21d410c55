"""Command-line front end of cellseg (click); the library lives in ``cellseg``."""
