"""Catalogue markers count only as lines of their own outside fenced code (DESIGN 3.4): a README
may quote them in prose or in code. Real runs in a real sqlite store, real README files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nf1prov import catalog
from nf1prov.errors import UserError
from tests.catalog_runs import client_for, experiment, model_run

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = catalog.BEGIN_MARKER, catalog.END_MARKER


@pytest.fixture
def client(tracking_uri):
    client = client_for(tracking_uri)
    model_run(client, experiment(client), "calm-cod-7")
    return client


def rebuild(tmp_path: Path, client, text: str, **kwargs) -> catalog.Rebuild:
    readme = tmp_path / "README.md"
    readme.write_bytes(text.encode())
    return catalog.rebuild(readme, catalog.fetch_runs(client), **kwargs)


def outside(text: str) -> tuple[str, str]:
    """(everything up to and including the begin marker line, everything from the end marker
    line on), found as the catalogue finds them."""
    markers = catalog.find_markers(text)
    return text[:markers.begin.end], text[markers.end.start:]


def test_the_projects_own_readme_quotes_the_markers_and_still_rebuilds(tmp_path, client):
    own = (REPO / "README.md").read_bytes().decode()
    assert f"`{BEGIN}`" in own  # quoted in the prose of its "Model catalogue" section
    result = rebuild(tmp_path, client, own)
    assert "**Codename:** calm-cod-7" in result.new
    if catalog.find_markers(own) is not None:  # everything outside the markers kept
        assert outside(result.new) == outside(own)
    else:  # markers added: the original text is all still there, in order
        assert result.new.startswith(own.split("## Model Descriptions")[0])


PROSE = (f"# Project\r\n\r\nThe list goes between `{BEGIN}` and `{END}`, or between\r\n"
         f"{BEGIN} and {END} written plainly in a sentence.\r\n\r\n")


def test_markers_quoted_in_prose_are_not_markers_crlf_kept(tmp_path, client):
    after = "\r\n## License\r\nMIT\r\n"
    text = PROSE + f"## Model Descriptions\r\n{BEGIN}\r\nold\r\n{END}" + after
    result = rebuild(tmp_path, client, text)
    before = PROSE + f"## Model Descriptions\r\n{BEGIN}\r\n"
    assert result.new.startswith(before) and result.new.endswith(END + after)
    block = result.new[len(before):-len(END + after)]
    assert "old" not in block and "calm-cod-7" in block
    assert block.count("\r\n") == block.count("\n")  # the README's CRLF inside too
    catalog.write_atomic(result.readme, result.new)
    assert not catalog.rebuild(result.readme, catalog.fetch_runs(client)).changed


FENCED = f"""# Project

Put these two lines in your README:

```markdown
## Model Descriptions
{BEGIN}
{END}
```

~~~~
```
{BEGIN}
~~~
{END}
~~~~

  ```` text
  {END}
  ````

## Model Descriptions

Hand-written notes.
"""


def test_markers_and_heading_inside_fenced_code_are_ignored(tmp_path, client):
    result = rebuild(tmp_path, client, FENCED)
    # the markers go under the real heading (the last one), not the one inside the fence;
    # everything before it, fenced copies of the markers included, is kept as it was
    prefix = FENCED.rsplit("## Model Descriptions\n", 1)[0] + "## Model Descriptions\n"
    assert result.new.startswith(prefix + BEGIN + "\n")
    assert result.new.endswith(END + "\n\nHand-written notes.\n")
    assert "calm-cod-7" in result.new[len(prefix):]
    # a second rebuild finds the markers it added
    catalog.write_atomic(result.readme, result.new)
    assert not catalog.rebuild(result.readme, catalog.fetch_runs(client)).changed


def test_a_fence_left_open_hides_the_end_marker_and_is_named(tmp_path, client):
    text = f"{BEGIN}\n```\nhand-made code, never closed\n{END}\n"
    with pytest.raises(UserError, match=r"1 x .*begin.* \(line 1\) and 0 x .*fence left open"):
        rebuild(tmp_path, client, text)
    assert (tmp_path / "README.md").read_text() == text  # nothing written


def test_marker_lines_in_template_output_follow_the_same_rule(tmp_path, client):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    quoted = (f"Rebuilt between `{BEGIN}` and `{END}`.\n\n"
              f"```\n{BEGIN}\n```\n")
    (tpl / "catalog.md.j2").write_text(quoted)
    result = rebuild(tmp_path, client, f"{BEGIN}\n{END}\n", template_dir=tpl)
    assert result.new == f"{BEGIN}\n{quoted}{END}\n"

    (tpl / "catalog.md.j2").write_text("````\ncode left open\n")
    with pytest.raises(UserError, match="leaves a ```` code fence open"):
        rebuild(tmp_path, client, f"{BEGIN}\n{END}\n", template_dir=tpl)


@pytest.mark.parametrize(("line", "is_marker"), [
    (BEGIN, True), (f"  {BEGIN}\t ", True), (f"> {BEGIN}", False), (f"x {BEGIN}", False),
    (f"{BEGIN} trailing", False), (f"`{BEGIN}`", False),
])
def test_a_marker_is_a_line_of_its_own(line, is_marker):
    assert (catalog.marker_kind(line) == "begin") is is_marker


def test_fence_rules():
    text = "```\na\n``\n~~~\nb\n```` \nc\n~~~ `x`\nd\n~~~~\ne\n``` `not a fence`\nf\n"
    prose, open_fence = catalog.prose_lines(text)
    # ``` opens, ``/~~~ do not close it, ```` (longer, blanks after) does; ~~~ with an info
    # string opens, ~~~~ closes; a backtick fence whose info string holds a backtick is text
    assert [line.content for line in prose] == ["c", "e", "``` `not a fence`", "f"]
    assert open_fence is None
    assert catalog.prose_lines("x\n~~~\ny")[1] == "~~~"


def test_the_marker_search_reads_what_reading_every_line_gives():
    """`marker_lines` skips the lines that cannot be fences or markers: it must find what the
    line-by-line reading finds, whatever the line endings, indents and fences."""
    pieces = [BEGIN, END, f"  {BEGIN}\t", f"\t{END} ", f"`{BEGIN}`", f"x {END}", "```", "````",
              " ```py", "``` `not a fence`", "~~~", "\t~~~~", "~~~ x", "text", "", "``"]
    rng = random.Random(15)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) + rng.choice(["\n", "\r\n", "\r"])
                       for _ in range(rng.randrange(10)))
        if rng.random() < 0.5:
            text = text.rstrip("\r\n")
        prose, fence = catalog.prose_lines(text)
        expected = [line for line in prose if catalog.marker_kind(line.content)]
        assert catalog.marker_lines(text) == (expected, fence), repr(text)
