"""Sphinx extension of the book: what the page shows of a chapter's code cells.

- Build markers are for the tools, not the reader: the exporter's `#| export` and
  `#| default_exp` lines and nbval's `# NBVAL_...` lines are removed from the code
  cells of the rendered page (the notebooks and the package keep them).
- The book's stylesheet (book/_static/book.css) is added to every page.
- A first visit starts in light mode (the reader can switch): without a default, the
  theme logs "Got invalid theme mode" as a console error.
- Each inline script is included once: sphinx-thebe 0.3.1 under Jupyter Book 1 adds its
  configuration script twice, and the second copy is a JavaScript error
  ("Identifier 'THEBE_JS_URL' has already been declared") on every page.
"""

from __future__ import annotations

import re

from docutils import nodes

MARKER = re.compile(r"^(#\|.*|# NBVAL_\w+.*)$")


def _is_code_cell(node: nodes.literal_block) -> bool:
    parent = node.parent
    while parent is not None:
        if "cell_input" in parent.get("classes", []):
            return True
        parent = parent.parent
    return False


def strip_markers(app, doctree) -> None:
    """Drop marker lines at the top of each code cell's source."""
    for block in list(doctree.findall(nodes.literal_block)):
        if not _is_code_cell(block):
            continue
        lines = block.astext().split("\n")
        kept = [line for line in lines if not MARKER.match(line.strip())]
        if len(kept) == len(lines):
            continue
        while kept and not kept[0].strip():
            kept.pop(0)
        text = "\n".join(kept)
        block.rawsource = text
        block.children = [nodes.Text(text)]


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Keep the first of identical script entries (same file, same inline body)."""
    if not context.get("default_mode"):  # pydata-sphinx-theme reads it when no mode is stored
        context["default_mode"] = "light"
    scripts, seen = context.get("script_files"), set()
    if not scripts:
        return
    kept = []
    for script in scripts:
        name = getattr(script, "filename", script) or ""  # inline scripts: None or ""
        key = (str(name), repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def setup(app):
    app.connect("doctree-read", strip_markers)
    app.connect("html-page-context", dedupe_scripts, priority=999)  # after those that add scripts
    app.add_css_file("book.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
