"""The catalogue in the README: the marker lines, splicing a rendered block between them, and
writing the file atomically (`rebuild` does it all: runs -> render -> splice).

A marker counts only as a line of its own outside fenced code (`find_markers`), so a README may
quote the markers in prose or in a code block.
"""


from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from nf1prov import tracking
from nf1prov.atomic import write_atomic as write_atomic  # the catalogue's interface
from nf1prov.catalog.render import build_context, render, template_dirs
from nf1prov.errors import UserError

BEGIN_MARKER = "<!-- nf1prov:catalog:begin -->"
END_MARKER = "<!-- nf1prov:catalog:end -->"
HEADING = "## Model Descriptions"


def check_block(block: str, dirs: list[Path]) -> None:
    """Refuse rendered text that would break the README's markers: a marker line of its own
    outside fenced code, or a code fence left open (it would hide the end marker)."""
    lines, open_fence = marker_lines(block)
    markers = [line.number for line in lines]
    where = f"(looked up in: {', '.join(map(str, dirs))})"
    if markers:
        raise UserError(
            f"The catalogue template output has a line holding only {BEGIN_MARKER!r} or "
            f"{END_MARKER!r} (output line {markers[0]}): remove the marker from the template, "
            f"or quote it inside text or a code block {where}.")
    if open_fence:
        raise UserError(
            f"The catalogue template output leaves a {open_fence} code fence open: close it in "
            f"the template, or the README's end marker would be read as code {where}.")


# --- README splicing --------------------------------------------------------------------------

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+\Z")
_EOL = re.compile(r"\r\n|\n|\r")
# A code fence: 3+ backticks or tildes, then (backticks only) an info string without backticks.
# Any indentation is accepted, so fences inside list items count too.
_FENCE = re.compile(r"[ \t]*(?P<fence>`{3,}|~{3,})(?P<rest>.*)")


@dataclass(frozen=True)
class Line:
    """One line of a README: ``number`` (1-based), ``start``/``end`` offsets in the text
    (``end`` after the line ending), ``content`` without its line ending, and ``eol``."""

    number: int
    start: int
    end: int
    content: str
    eol: str


def split_lines(text: str) -> list[Line]:
    """Every line of ``text`` (CRLF, LF and CR endings; the last line may have none)."""
    lines = []
    for number, match in enumerate(_LINE.finditer(text), start=1):
        raw = match.group(0)
        content = raw.rstrip("\r\n")
        lines.append(Line(number, match.start(), match.end(), content, raw[len(content):]))
    return lines


def prose_lines(text: str) -> tuple[list[Line], str | None]:
    """(the lines outside fenced code, the fence still open at the end or None).

    CommonMark fences: a line opening with 3+ backticks or tildes starts a code block that the
    next line holding only a fence of the same character, at least as long, closes; an
    unclosed fence runs to the end of the text. Fence lines themselves are not prose.
    """
    return _outside_fences(split_lines(text))


# The start of a line that may open or close a fence, or be a marker line: no other line
# changes what `_outside_fences` reports about fences and markers.
_SIGNIFICANT_START = rf"[ \t]*(?:`{{3}}|~{{3}}|{re.escape(BEGIN_MARKER)}|{re.escape(END_MARKER)})"
_SIGNIFICANT_AFTER_EOL = re.compile(rf"[\r\n](?={_SIGNIFICANT_START})")


def significant_lines(text: str) -> list[Line]:
    """The lines of ``text`` that may be fences or markers, as `split_lines` gives them; the
    marker search reads these alone instead of every line of a long catalogue."""
    starts = [match.end() for match in _SIGNIFICANT_AFTER_EOL.finditer(text)]
    if re.match(_SIGNIFICANT_START, text):
        starts.insert(0, 0)
    lines, number, counted = [], 1, 0
    for start in starts:
        number += len(_EOL.findall(text, counted, start))
        counted = start
        raw = _LINE.match(text, start).group(0)
        content = raw.rstrip("\r\n")
        lines.append(Line(number, start, start + len(raw), content, raw[len(content):]))
    return lines


def marker_lines(text: str) -> tuple[list[Line], str | None]:
    """(the marker lines outside fenced code, the fence still open at the end or None): what
    `prose_lines` says about markers and fences, reading only `significant_lines`."""
    prose, fence = _outside_fences(significant_lines(text))
    return [line for line in prose if marker_kind(line.content)], fence


def _outside_fences(lines: list[Line]) -> tuple[list[Line], str | None]:
    prose, fence = [], None
    for line in lines:
        match = _FENCE.fullmatch(line.content)
        if fence is None:
            if match and not (match["fence"][0] == "`" and "`" in match["rest"]):
                fence = match["fence"]
            else:
                prose.append(line)
        elif (match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence)
              and not match["rest"].strip()):
            fence = None
    return prose, fence


def marker_kind(content: str) -> str | None:
    """"begin" or "end" when a line (without its ending) is a marker of its own, else None."""
    stripped = content.strip(" \t")
    return {BEGIN_MARKER: "begin", END_MARKER: "end"}.get(stripped)


@dataclass(frozen=True)
class Markers:
    """The two marker lines of a README; the catalogue block is ``text[begin.end:end.start]``."""

    begin: Line
    end: Line

    def block(self, text: str) -> str:
        return text[self.begin.end:self.end.start]


def find_markers(text: str, readme: Path | str = "README.md") -> Markers | None:
    """The begin and end marker lines outside fenced code; None when there are none.

    Raises UserError naming the lines when they are broken (one missing, either one
    duplicated, or end before begin).
    """
    found: dict[str, list[Line]] = {"begin": [], "end": []}
    for line in marker_lines(text)[0]:
        found[marker_kind(line.content)].append(line)
    begins, ends = found["begin"], found["end"]
    if not begins and not ends:
        return None
    if len(begins) == len(ends) == 1 and begins[0].number < ends[0].number:
        return Markers(begins[0], ends[0])

    def at(lines: list[Line]) -> str:
        return f" (line {', '.join(str(line.number) for line in lines)})" if lines else ""

    raise UserError(
        f"{readme}: the catalogue markers are broken (found {len(begins)} x {BEGIN_MARKER}"
        f"{at(begins)} and {len(ends)} x {END_MARKER}{at(ends)}; expected one of each, begin "
        "first, each on a line of its own). Markers quoted in text or inside fenced code do "
        "not count: check for a ``` fence left open. Fix or delete them and run "
        "`nf1prov catalog` again."
    )


def line_ending(text: str, markers: Markers | None = None) -> str:
    """The README's line ending: that of the begin marker's line, else the first one found."""
    if markers is not None and markers.begin.eol:
        return markers.begin.eol
    match = _EOL.search(text)
    return match.group(0) if match else "\n"


def splice(text: str, block: str, readme: Path | str = "README.md") -> str:
    """``text`` with ``block`` (LF lines) between the marker lines; all other bytes unchanged.

    Without markers they are added (with the block) right below the first `## Model
    Descriptions` line outside fenced code, else appended with that heading at the end.
    """
    markers = find_markers(text, readme)
    eol = line_ending(text, markers)
    body = block.replace("\n", eol)
    if markers is not None:
        return text[:markers.begin.end] + body + text[markers.end.start:]
    section = f"{BEGIN_MARKER}{eol}{body}{END_MARKER}{eol}"
    prose, _ = prose_lines(text)
    heading = next((line for line in prose
                    if re.fullmatch(rf"{re.escape(HEADING)}[ \t]*", line.content)), None)
    if heading:
        sep = "" if heading.eol else eol
        return text[:heading.end] + sep + section + text[heading.end:]
    if text and not text.endswith(("\n", "\r")):
        text += eol
    return text + (eol if text else "") + HEADING + eol + section


def catalogue_block(text: str, readme: Path | str = "README.md") -> tuple[str, int] | None:
    """(the text between the marker lines, line number of its first line); None without
    markers. Raises UserError for broken markers."""
    markers = find_markers(text, readme)
    if markers is None:
        return None
    return markers.block(text), markers.begin.number + 1


def read_readme(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8 first.") from exc
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc}.") from exc


def unified_diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


@dataclass(frozen=True)
class Rebuild:
    """A README before and after the catalogue rebuild (nothing written yet)."""

    readme: Path
    old: str
    new: str
    model_count: int

    @property
    def changed(self) -> bool:
        return self.old != self.new

    @functools.cached_property
    def old_block(self) -> tuple[str, int] | None:
        """(the README's catalogue block now, its first line number); None without markers."""
        return catalogue_block(self.old, self.readme)

    @functools.cached_property
    def new_block(self) -> str:
        """The block as written between the markers (the README's line endings)."""
        found = catalogue_block(self.new, self.readme)
        assert found is not None  # splice always leaves markers
        return found[0]


def rebuild(readme: Path, runs: list, *, tracking_uri: str | None = None,
            repo_root: Path | None = None, template_dir: Path | None = None,
            registered: dict[str, list[str]] | None = None) -> Rebuild:
    """Render the catalogue for ``runs`` and splice it into the README text (nothing written)."""
    readme = Path(readme)
    with tracking.gc_paused():  # a few objects per value shown, thousands of values
        context = build_context(runs, tracking_uri, registered)
        dirs = template_dirs(repo_root, template_dir)
        block = render(context, dirs)
        check_block(block, dirs)
    old = read_readme(readme)
    return Rebuild(readme, old, splice(old, block, readme), context["model_count"])


