"""fedleak: a networked federated-learning privacy testbed.

Every module imports as ``fedleak.*``. The role packages live in the top-level folders of the
checkout (``server/``, ``clients/``, ``attacker/``, ``proto/``): an installed wheel maps them to
``fedleak/server`` and so on (pyproject's package-dir). In a source tree, and in the Flower App
Bundle that ``flwr run`` builds from it (which Flower puts first on ``sys.path``), they sit beside
this package instead, so the tree's root is searched for subpackages too.
"""

from pathlib import Path

_TREE = Path(__file__).resolve().parent.parent
if (_TREE / "pyproject.toml").is_file() and (_TREE / "server" / "__init__.py").is_file():
    __path__.append(str(_TREE))  # noqa: F821 (a package's __path__ is set by the import system)
