"""Print the cycles of the project's module import graph (module- and function-level imports alike).

Uses grimp, the graph library behind import-linter (``make test`` runs both). Exits 1 when a cycle
exists, so a new cycle fails the build.

    python .ci/import_cycles.py [PACKAGE ...]      # default: zoo training export serving
"""

from __future__ import annotations

import sys

import grimp


def cycles(graph, modules: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(modules)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            recursed = False
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recursed = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if recursed:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def main() -> int:
    packages = sys.argv[1:] or ["zoo", "training", "export", "serving"]
    graph = grimp.build_graph(*packages, cache_dir=None)
    modules = sorted(graph.modules)
    found = cycles(graph, modules)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    n_edges = sum(len(graph.find_modules_directly_imported_by(m)) for m in modules)
    print(f"{len(modules)} modules, {n_edges} import edges, {len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
