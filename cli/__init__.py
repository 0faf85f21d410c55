"""Command-line front end of cellseg (click), installed as ``cellseg.cli``."""
