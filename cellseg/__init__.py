"""cellseg: CausalCellSegmenter nucleus segmentation for whole-slide images.

The library never imports click. The command line is the ``cellseg.cli`` subpackage, whose code
lives in the repository's top-level ``cli/`` folder (pyproject ``package-dir``): installed, it is
``site-packages/cellseg/cli``; in a source checkout the repository root is added to this
package's search path so that ``import cellseg.cli`` finds ``cli/`` there too.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "cli" / "main.py").is_file():
    __path__.append(str(_CHECKOUT))  # a source checkout: cellseg.cli is ../cli
