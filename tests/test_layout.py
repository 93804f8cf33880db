"""The project's layout: no root module shadows an installed package."""
import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def root_modules(root=ROOT):
    """Import names the repository's root defines: each *.py and each package folder."""
    names = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    names |= {d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py"))}
    return sorted(names)


def test_no_root_module_shadows_an_installed_package():
    """A script's folder comes first on sys.path, so a root module named like an installed
    package's import name replaces it for every import (transformers >= 5.25 imports `kernels`)."""
    installed = importlib.metadata.packages_distributions()     # import name -> [distributions]
    clashes = [f"{m}.py / {m}/ shadows the package of {', '.join(installed[m])}"
               for m in root_modules() if m in installed]
    assert not clashes, "; ".join(clashes)
