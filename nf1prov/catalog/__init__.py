"""The README model catalogue (DESIGN 3.4): MLflow model runs -> Markdown through Jinja templates.

Flow: `fetch_runs` (every model run, newest first; a sqlite store read directly) ->
`build_context` (plain dicts, values still raw user text) -> `render` (`render.py`) -> `splice`
between the markers (`readme.py`) -> `write_atomic`. `repository.py` keeps hand edits of the
block from being overwritten and commits the block alone (`catalog --commit`); `history.py`
imports the catalogue of models trained before nf1prov from git history.
`benchmarks/bench_catalog.py` times it for 10 and 1,200 models.

The names below are the catalogue's interface; the modules hold the rest.
"""

from nf1prov.catalog.history import import_history, parse_subject
from nf1prov.catalog.readme import (
    BEGIN_MARKER,
    END_MARKER,
    HEADING,
    Rebuild,
    catalogue_block,
    check_block,
    find_markers,
    marker_kind,
    marker_lines,
    prose_lines,
    rebuild,
    splice,
    unified_diff,
    write_atomic,
)
from nf1prov.catalog.render import (
    CLASSES,
    METRICS_READ,
    PARAMS_READ,
    TEMPLATE_NAME,
    build_context,
    code_span,
    description,
    environment,
    escape_md,
    fetch_runs,
    newest_first,
    render,
    render_entry,
    template_dirs,
)
from nf1prov.catalog.repository import COMMIT_SUBJECT

__all__ = [
    "BEGIN_MARKER", "CLASSES", "COMMIT_SUBJECT", "END_MARKER", "HEADING", "METRICS_READ",
    "PARAMS_READ", "TEMPLATE_NAME", "Rebuild", "build_context", "catalogue_block", "check_block",
    "code_span", "description", "environment", "escape_md", "fetch_runs", "find_markers",
    "import_history", "marker_kind", "marker_lines", "newest_first", "parse_subject",
    "prose_lines", "rebuild", "render", "render_entry", "splice", "template_dirs",
    "unified_diff", "write_atomic",
]
