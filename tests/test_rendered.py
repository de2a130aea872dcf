"""The committed rendered notebooks (``make render``): outputs present, no error output, no volatile metadata."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RENDERED = sorted((REPO / "notebooks" / "rendered").glob("*/[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(REPO / "scripts"))


@pytest.mark.skipif(not RENDERED, reason="no rendered notebooks committed yet (make render)")
@pytest.mark.parametrize("path", RENDERED, ids=[f"{p.parent.name}/{p.stem}" for p in RENDERED])
def test_rendered_copy_has_outputs_and_no_error(path):
    import nbformat
    import render_notebooks

    nb = nbformat.read(path, as_version=4)
    assert render_notebooks.errors(nb) == [], f"{path.name} holds error output: rerun make render"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(c.outputs for c in code), f"{path.name} has no outputs"
    assert "papermill" not in nb.metadata
    for cell in code:
        assert "execution" not in cell.metadata and "papermill" not in cell.metadata
    assert path.stat().st_size < 5 * 2**20, f"{path.name} is over 5 MB"
    source = REPO / "notebooks" / path.name
    assert source.exists(), f"{path.name} has no source notebook in notebooks/"


def test_clean_strips_volatile_metadata_and_progress():
    import nbformat
    import render_notebooks
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    cell = new_code_cell("x", metadata={"execution": {"iopub.status.busy": "2026"}, "papermill": {"duration": 1}})
    cell.outputs = [new_output("stream", name="stderr", text="bank:  10%|#   | 1/10\rbank: 100%|###| 10/10\n"),
                    new_output("stream", name="stderr", text="\x1b[A"),  # a nested bar's cursor-up, alone
                    new_output("stream", name="stderr", text="\x1b[Adone\n"),
                    new_output("stream", name="stdout", text="kept\n"),
                    new_output("stream", name="stderr", text=f"{render_notebooks.REPO}/lib/x.py:8: Warn\n"),
                    new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"a": 1}}),
                    new_output("display_data", data={"image/png": "iVBORw0KGgo=", "image/svg+xml": "<svg/>",
                                                     "text/plain": "<Figure>"})]
    nb = new_notebook(cells=[cell], metadata={"papermill": {"start_time": "x"}, "widgets": {},
                                              "language_info": {"name": "python", "version": "3.11.9"}})
    out = render_notebooks.clean(nb)
    assert "papermill" not in out.metadata and out.metadata.language_info == {"name": "python"}
    c = out.cells[0]
    assert c.metadata == {}
    assert [o.output_type for o in c.outputs] == ["stream", "stream", "stream", "display_data"]
    assert [o.text.strip() for o in c.outputs[:3]] == ["done", "kept", "lib/x.py:8: Warn"]  # relative to the repo
    assert set(c.outputs[3].data) == {"image/png", "text/plain"}
    long = new_notebook(cells=[new_code_cell("x")])
    long.cells[0].outputs = [new_output("stream", name="stdout", text="\n".join(map(str, range(100))))]
    once = render_notebooks.clean(long, max_lines=60)
    assert once.cells[0].outputs[0].text.endswith("... (40 more lines cut in the rendered copy)")
    assert render_notebooks.clean(once, max_lines=60) == once  # --clean-only on a committed copy changes nothing
    bad = new_notebook(cells=[new_code_cell("1/0")])
    bad.cells[0].outputs = [new_output("error", ename="ZeroDivisionError", evalue="x", traceback=[])]
    assert render_notebooks.errors(bad) == ["cell 0: ZeroDivisionError: x"]
    assert nbformat.validate(out) is None


def test_render_hands_its_run_options_to_the_notebook(tmp_path, monkeypatch):
    """``--categories`` / ``--out-dir`` reach the notebook's parameters cell (a real-profile render on one
    category writes its tables outside the repository); the cleaned copy lands in rendered/<profile>/."""
    import nbformat
    import render_notebooks
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    seen = {}

    def fake_run(nb_path, raw, params, timeout, progress=False):
        seen.update(params)
        cell = new_code_cell("print(1)")
        cell.outputs = [new_output("stream", name="stdout", text="1\n")]
        nbformat.write(new_notebook(cells=[cell]), str(raw))

    monkeypatch.setattr(render_notebooks.run_notebooks, "run_one", fake_run)
    monkeypatch.setattr(render_notebooks, "RENDERED", tmp_path / "rendered")
    argv = ["--profile", "real", "--only", "03", "--categories", "bottle", "--out-dir", str(tmp_path / "out")]
    assert render_notebooks.main(argv) == 0
    assert (seen["profile"], seen["categories"], seen["out_dir"]) == ("real", "bottle", str(tmp_path / "out"))
    assert (tmp_path / "rendered" / "real" / "03_roda.ipynb").exists()


@pytest.mark.skipif(not RENDERED, reason="no rendered notebooks committed yet (make render)")
@pytest.mark.parametrize("path", RENDERED, ids=[f"{p.parent.name}/{p.stem}" for p in RENDERED])
def test_rendered_copy_shows_the_current_code(path):
    """A rendered copy whose code cells differ from its notebook's shows code that may no longer run: re-render."""
    import nbformat

    def code(nb):
        return [c.source for c in nb.cells
                if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]

    rendered = nbformat.read(path, as_version=4)
    source = nbformat.read(REPO / "notebooks" / path.name, as_version=4)
    assert code(rendered) == code(source), f"{path} shows older code than notebooks/{path.name}: make render"
