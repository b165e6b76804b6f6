"""torch.utils.cpp_extension, imported without its no-GPU notice (notebook 05_cpp_extension).

When torch.utils.cpp_extension is first imported it looks for the CUDA toolkit, and a CUDA
build of PyTorch that finds one on a machine without a GPU logs "No CUDA runtime is found,
using CUDA_HOME=..." to stderr (a ROCm build: "No ROCm runtime is found"). Nothing is wrong
then: the C++ kernels are built and used on the CPU, and rwkv_lib.extension.extension_status()
says why there are no CUDA kernels. But the notice would appear only on such machines, in
notebook set-up cells whose stored outputs have none, so this module imports cpp_extension
with exactly that record dropped; every other message of torch's extension builder still
shows. Import `cpp_extension` from here before anything else imports it: a later
`from torch.utils import cpp_extension` gets the same, already imported module.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

_NAME = "torch.utils.cpp_extension"  # also the name of the logger it writes to
_NOTICES = ("No CUDA runtime is found", "No ROCm runtime is found")


def _not_the_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICES)


def import_cpp_extension() -> types.ModuleType:
    """Import torch.utils.cpp_extension (once per process) without the no-GPU notice."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    logger = logging.getLogger(_NAME)
    logger.addFilter(_not_the_notice)
    try:
        return importlib.import_module(_NAME)
    finally:
        logger.removeFilter(_not_the_notice)


cpp_extension = import_cpp_extension()
