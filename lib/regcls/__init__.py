"""regcls: reproduce Lappe & Giese (NeurIPS 2025) -- register and [CLS] tokens in large ViTs.

Data flow: images -> image store -> model (timm) -> trace (.npz, one forward pass) -> metrics -> figures.
"""
__version__ = "0.1.0"
REPOSITORY = "https://github.com/regcls/regcls"  # must equal repository.url in _config.yml (tested)

from .errors import RegclsError  # noqa: E402,F401
