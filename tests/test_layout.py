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


# -- three layers, each importing only downward ----------------------------------------------------
# 0 the machinery (machinery/), 1 the paper (the card's five root files), 2 the applications (apps/,
# bench/, and the command lines search.py and explain.py). A module may import its own layer or below.
PAPER = ("metaembed", "maxsim", "train", "evaluate", "data")


def layer_of(module):
    top = module.split(".")[0]
    return 0 if top == "machinery" else 1 if top in PAPER else 2 if top in ("apps", "bench", "search", "explain") \
        else None


def project_imports(root=ROOT):
    """-> {module: {project modules it imports, at any depth of its code}} for every project file."""
    import ast
    found = {}
    for folder in (".", "machinery", "apps", "bench"):
        for f in sorted(os.listdir(os.path.join(root, folder))):
            if not f.endswith(".py"):
                continue
            name = f[:-3] if folder == "." else f"{folder}.{f[:-3]}".replace(".__init__", "")
            tree = ast.parse(open(os.path.join(root, folder, f)).read())
            deps = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            found[name] = {d for d in deps if layer_of(d) is not None and d != name}
    return {m: {d for d in deps if d in found or d.split(".")[0] in PAPER} for m, deps in found.items()}


def upward_imports(graph):
    """Every edge of {module: {modules it imports}} that goes to a higher layer, said in words."""
    return [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in graph.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]


def import_cycles(graph):
    """Each module that reaches itself again, with the path, said as 'a -> b -> a'."""
    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for d in graph.get(node, ()):
                if d == start:
                    return path + [d]
                if d not in path:
                    stack.append((d, path + [d]))
    return [" -> ".join(c) for c in map(cycle_from, graph) if c]


def test_layers_import_only_downward():
    ups = upward_imports(project_imports())
    assert not ups, "; ".join(ups)


def test_no_import_cycles():
    cycles = import_cycles(project_imports())
    assert not cycles, "; ".join(cycles)


def test_the_layer_checks_can_fail():
    """The two checkers find what they look for on a made-up graph with exactly one upward edge
    (the machinery importing the paper) and one cycle (two applications importing each other),
    and nothing on the same graph without them; the real graph they check is not empty."""
    clean = {"machinery.index": {"machinery.checks"}, "machinery.checks": set(),
             "maxsim": {"machinery.index"}, "metaembed": {"maxsim", "machinery.checks"},
             "data": set(), "apps.serve": {"apps.search_index", "metaembed"}, "apps.search_index": {"maxsim"}}
    assert upward_imports(clean) == [] and import_cycles(clean) == []
    bad = {**clean, "machinery.checks": {"data"},                              # one upward edge
           "apps.search_index": {"maxsim", "apps.serve"}}                    # one cycle
    assert upward_imports(bad) == ["machinery.checks (layer 0) imports data (layer 1)"]
    assert sorted(import_cycles(bad)) == ["apps.search_index -> apps.serve -> apps.search_index",
                                          "apps.serve -> apps.search_index -> apps.serve"]
    graph = project_imports()
    assert "maxsim" in graph["metaembed"] and "machinery.cpu_kernel" in graph["maxsim"]
