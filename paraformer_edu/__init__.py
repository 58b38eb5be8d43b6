"""paraformer_edu: Paraformer from scratch, the package of the paraformer-edu book.

Each module is generated from the chapter that builds it (see its banner); this
file, hand-written, gathers the public API.
"""

__version__ = "0.1.0"
