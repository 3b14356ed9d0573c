"""Stand-ins for the data and plotting packages where they are not installed, so that
gpu_check.py runs with torch and numpy alone (a GPU machine's image may have nothing else).

The project's modules import pandas, scipy, matplotlib, tqdm ... at their tops for functions
that gpu_check never calls. Imported before them, this module makes such an import of an
absent package give a stand-in module; calling anything from it raises ModuleNotFoundError
naming the package. Installed packages are untouched (the stand-ins' finder is asked last).
``withdraw()``, once the project's modules are imported, removes the finder and the stand-ins
from sys.modules, so that later imports (torch's own checks for optional packages) see the
packages as absent again.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

OPTIONAL_PACKAGES = ("pandas", "scipy", "matplotlib", "tqdm", "wfdb", "sklearn", "safetensors", "huggingface_hub")
# Calls that the project's modules make while being imported: without the package they do nothing.
IMPORT_TIME_CALLS = {"matplotlib.use"}


class Absent:
    """A name from an absent package: its attributes are stand-ins too; calling it raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return Absent(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        if self._name in IMPORT_TIME_CALLS:
            return None
        package = self._name.split(".")[0]
        raise ModuleNotFoundError(f"{self._name} needs {package}, which is not installed", name=package)


class AbsentModule(types.ModuleType):
    """The stand-in for an absent package or submodule (a package: its submodules are stand-ins)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []

    def __getattr__(self, attribute: str) -> Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return Absent(f"{self.__name__}.{attribute}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Asked only after every other finder failed: an absent optional package, or a submodule of
    one (an installed package's own missing submodules stay missing: it may probe for them)."""

    def find_spec(self, fullname, path, target=None):
        parent, _, _ = fullname.rpartition(".")
        if (fullname in OPTIONAL_PACKAGES if not parent
                else isinstance(sys.modules.get(parent), AbsentModule)):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return AbsentModule(spec.name)

    def exec_module(self, module):
        pass


_FINDER = _Finder()


def standing_in() -> list[str]:
    """The packages (and submodules) now replaced by stand-ins, sorted."""
    return sorted(name for name, module in sys.modules.items() if isinstance(module, AbsentModule))


def withdraw() -> list[str]:
    """Remove the finder and the stand-ins from sys.modules; returns the names that stood in."""
    names = standing_in()
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in names:
        del sys.modules[name]
    return names


sys.meta_path.append(_FINDER)
