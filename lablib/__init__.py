"""lablib: the Parameter-Efficiency Lab's library.

Every technique the labs teach lives here, once; the notebooks in `labs/` import it and walk through it.
Submodules are imported on demand (`import lablib.data`, `from lablib import models`), so `import lablib`
stays cheap and does not pull torch until a technique is used.
"""

__version__ = "0.1.0"
