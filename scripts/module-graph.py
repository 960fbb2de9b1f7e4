#!/usr/bin/env python3
"""Prints tollgate's module dependency graph (from `crate::` paths) and its cycles.

Usage: scripts/module-graph.py [DEPTH]   (DEPTH 1: top-level modules, 2: one level below)
A module's node is its path under src/ cut to DEPTH segments; an edge A -> B means a file of A
names `crate::B…`. Cycles are the strongly connected components with more than one node.
Written by hand because cargo-modules pulls in rust-analyzer (a long build on 2 cores).
"""
import os, re, sys
from collections import defaultdict

DEPTH = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ROOT = os.path.join(os.path.dirname(__file__), "..", "src")

def node(parts):
    parts = [p for p in parts if p not in ("mod", "lib", "main")]
    return "::".join(parts[:DEPTH]) or "lib"

modules = set()
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if f.endswith(".rs"):
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            modules.add(node(rel))

edges = defaultdict(set)
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        src = node(rel)
        text = open(path).read()
        text = text.split("#[cfg(test)]")[0]  # unit tests may reach anywhere
        for m in re.finditer(r"crate::([a-z_]+(?:::[a-z_]+)*)", text):
            parts = m.group(1).split("::")
            # keep only the module part of the path
            while parts and node(parts) not in modules:
                parts = parts[:-1]
            if parts:
                dst = node(parts)
                if dst != src and not dst.startswith(src + "::") and not src.startswith(dst + "::"):
                    edges[src].add(dst)

# Tarjan's strongly connected components.
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for v in sorted(modules):
    if v not in index:
        strong(v)

for src in sorted(edges):
    print(f"{src} -> {', '.join(sorted(edges[src]))}")
cycles = [sorted(c) for c in sccs if len(c) > 1]
print(f"\n{len(cycles)} cycle(s)")
for c in cycles:
    print("  cycle: " + " <-> ".join(c))
