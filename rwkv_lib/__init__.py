"""rwkv_lib: RWKV-4 from scratch, the finished pieces of the rwkv-notebooks series.

Each module's docstring names the notebook that explains it.
"""

__version__ = "0.1.0"
