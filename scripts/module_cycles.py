#!/usr/bin/env python3
"""Import cycles between the files of one crate.

Usage: scripts/module_cycles.py [--with-mod] CRATE_SRC_DIR [MODULE_PREFIX]

Every `crate::a::b`, `super::a`, `self::a` path in a file (use lines and
inline paths; comments and a trailing inline test module are ignored;
`mod x;` declarations are edges only with --with-mod) is
resolved to the file of the longest module prefix it names: that is one edge.
Prints each strongly connected component of more than one file (largest
first), the size of the largest, and each import of a handler file (one
that registers methods: handlers should import shared helpers only); with
MODULE_PREFIX (e.g. `methods`) only
files under that module count. Exits 0; the figures are what it reports.
"""

import os
import re
import sys


def module_files(src):
    """Maps module paths (tuples, () is the crate root) to their files."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            mods[tuple(parts)] = rel
    return mods


def strip_comments(text):
    """Drops comments, and a trailing `#[cfg(test)] mod tests` (its `super` is
    the file's own module, and tests are not the module structure)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def expand_groups(path):
    """`a::{b, c::{d}}` -> [a::b, a::c::d] (nested groups, `self` items)."""
    m = re.match(r"^(.*?)::\{(.*)\}$", path, flags=re.S)
    if not m:
        return [path]
    head, body = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in items:
        it = re.sub(r"\s+as\s+\w+$", "", it.strip())
        if not it:
            continue
        if it == "self":
            out.append(head)
        else:
            out.extend(expand_groups(head + "::" + it))
    return out


PATH = re.compile(r"\b(?:crate|super|self)(?:::(?:\w+|\{[^;]*?\}))+")
USE = re.compile(r"\buse\s+((?:crate|super|self)::[^;]+);", flags=re.S)


def own_module(rel):
    parts = rel[:-3].split(os.sep)
    is_dir_mod = parts[-1] in ("mod", "lib", "main")
    if is_dir_mod:
        parts = parts[:-1]
    return tuple(parts), is_dir_mod


def resolve(path, here, mods):
    segs = [s for s in path.replace(" ", "").split("::") if s]
    cur = list(here)
    if segs[0] == "crate":
        cur = []
        segs = segs[1:]
    else:
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                cur = cur[:-1]
            segs = segs[1:]
    full = cur + segs
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in mods:
            return tuple(full[:n])
    return None


MOD = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", flags=re.M)


def edges(src, mods, with_mod):
    out = {m: set() for m in mods}
    for mod, rel in mods.items():
        text = strip_comments(open(os.path.join(src, rel), encoding="utf-8").read())
        here, _ = own_module(rel)
        paths = []
        for u in USE.finditer(text):
            paths.extend(expand_groups(u.group(1).strip()))
        text_wo_use = USE.sub("", text)
        paths.extend(p.group(0) for p in PATH.finditer(text_wo_use))
        if with_mod:
            paths.extend("self::" + m for m in MOD.findall(text))
        for p in paths:
            if p.rstrip(":").endswith("*"):
                p = p.rsplit("::", 1)[0]
            # Paths resolve from the file's module: `super` is its parent.
            target = resolve(p, here, mods)
            if target is None or target == mod:
                continue
            out[mod].add(target)
    return out


def sccs(graph):
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return comps


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    args = [a for a in sys.argv[1:] if a != "--with-mod"]
    with_mod = len(args) < len(sys.argv) - 1
    if not args:
        sys.exit(__doc__)
    src = args[0]
    prefix = tuple(args[1].split("::")) if len(args) > 1 else ()
    mods = module_files(src)
    mods = {m: f for m, f in mods.items() if m[: len(prefix)] == prefix}
    g = edges(src, mods, with_mod)
    g = {m: {t for t in ts if t in mods} for m, ts in g.items()}
    nedges = sum(len(ts) for ts in g.values())
    comps = sorted((c for c in sccs(g) if len(c) > 1), key=len, reverse=True)
    print(f"{len(mods)} files, {nedges} edges, {len(comps)} cycle(s)")
    for c in comps:
        print(f"  {len(c)} files: " + ", ".join(sorted(mods[m] for m in c)))
    print(f"largest strongly connected component: {len(comps[0]) if comps else 1} file(s)")
    # A handler file registers methods; it should import shared helpers only.
    handlers = {m for m, f in mods.items() if "fn register(" in open(os.path.join(src, f)).read()}
    into = sorted((mods[m], mods[t]) for m, ts in g.items() for t in ts if t in handlers)
    print(f"imports of handler files (files with `fn register(`): {len(into)}")
    for a, b in into:
        print(f"  {a} -> {b}")


if __name__ == "__main__":
    main()
