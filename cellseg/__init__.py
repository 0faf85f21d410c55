"""cellseg: CausalCellSegmenter nucleus segmentation for whole-slide images.

The library never imports click; the command line lives in the sibling ``cli`` package.
"""

__version__ = "0.1.0"
