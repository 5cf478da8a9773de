"""The import figures of yolosafe that docs/design.md cites: modules, import edges between them, and edges between
packages (``yolosafe.X`` level), read by grimp (import-linter's graph) from the source, nothing run.

    python tools/import_figures.py
"""

from __future__ import annotations

import grimp


def figures(package: str = "yolosafe") -> dict[str, int]:
    graph = grimp.build_graph(package, cache_dir=None)
    modules = sorted(graph.modules)
    edges = {(m, i) for m in modules for i in graph.find_modules_directly_imported_by(m)}

    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages = {(top(a), top(b)) for a, b in edges if top(a) != top(b)}
    return {"modules": len(modules), "import edges": len(edges), "edges between packages": len(packages),
            "packages and leaves": len({top(m) for m in modules}) - 1}


if __name__ == "__main__":
    for name, value in figures().items():
        print(f"{name}: {value}")
