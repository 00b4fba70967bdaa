"""Run the ```python blocks of a Markdown document, so the document cannot rot.

    blocks = python_blocks("docs/writing-a-layer.md")   # [(first line number, source), ...]
    run_blocks("docs/writing-a-layer.md")               # runs them in order, in one namespace

Only fences opened with exactly ```python count; other fences (``` alone, ```bash, ```text) are
shown to the reader and not run. A block that raises is reported with the document's name and the
line the block starts on.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")


def python_blocks(path):
    """[(line number of the block's first code line, source)] for every ```python block of path
    (relative to the repository root, or absolute). An unclosed fence is an error."""
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    with open(full, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start}: code fence {fence!r} is never closed")
        i += 1
        if lang == "python":
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def run_blocks(path, namespace=None):
    """Execute every ```python block of path in order in one namespace (returned). The blocks run as
    a reader would paste them; a failing block raises an AssertionError naming path and line."""
    ns = {"__name__": "__doc_blocks__"} if namespace is None else namespace
    for line, src in python_blocks(path):
        code = compile("\n" * (line - 1) + src, os.path.basename(path), "exec")
        try:
            exec(code, ns)
        except Exception as exc:  # noqa: BLE001 - reported with the document's line
            raise AssertionError(f"{path}: the python block at line {line} raised "
                                 f"{type(exc).__name__}: {exc}") from exc
    return ns
