#!/usr/bin/env python
"""Executed copies of the notebooks, with their outputs, for reading on the repository page.

    python scripts/render_notebooks.py                       # every notebook, default profile (make render)
    python scripts/render_notebooks.py --only 01 02          # a subset
    python scripts/render_notebooks.py --clean-only          # re-clean the committed copies, run nothing

Each notebook runs through papermill (as ``scripts/run_notebooks.py`` does; figures and tables go to
``figures/<profile>/`` and ``results/<profile>/``); the executed copy is then cleaned so that a rerun
diffs only where a number or figure changed, and written to ``notebooks/rendered/<profile>/``:

- no volatile metadata: papermill's timings and parameters blocks, execution timestamps, kernel and
  Python versions, widget state;
- outputs kept: text, HTML tables, PNG figures; dropped: widget views, SVG/PDF duplicates of a PNG,
  progress-bar streams (tqdm ``\\r`` updates); long text outputs are cut to ``--max-lines`` lines;
- a notebook whose copy would exceed ``--max-mb`` is reported (figures should be PNG at modest dpi).

The source notebooks in ``notebooks/`` stay without outputs.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import run_notebooks  # noqa: E402

RENDERED = REPO / "notebooks" / "rendered"
DROP_MIME = ("application/vnd.jupyter.widget-view+json", "image/svg+xml", "application/pdf")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control (a nested tqdm bar's cursor-up, colours)
PROGRESS = re.compile(r"\r|\d+%\||TqdmWarning: IProgress not found|from \.autonotebook import tqdm")
CHECKOUT = re.compile(r"/[^\s'\"]*/(?=(?:figures|results|cache|runs|notebooks)/)")
CUT = re.compile(r"\.\.\. \(\d+ more lines cut in the rendered copy\)")
ERRORS_TEXT = re.compile(r"Traceback \(most recent call last\)")


def _clean_stream(text: str, max_lines: int) -> str:
    # the machine's checkout path is noise: paths read relative to the repo (lib/... in a warning, results/...)
    text = CHECKOUT.sub("", ANSI.sub("", text).replace(f"{REPO}/", ""))
    lines = [line for line in text.split("\n") if not PROGRESS.search(line)]
    already_cut = len(lines) == max_lines + 1 and CUT.fullmatch(lines[-1])  # a re-clean keeps the first count
    if len(lines) > max_lines and not already_cut:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines cut in the rendered copy)"]
    return "\n".join(lines)


def clean(nb, max_lines: int = 60):
    """A copy of ``nb`` (nbformat v4) without volatile metadata, widgets or progress bars."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": nb.metadata.get("language_info", {}).get("name", "python")}
    for i, cell in enumerate(nb.cells):
        for key in ("papermill", "execution", "collapsed", "scrolled", "ExecuteTime"):
            cell.metadata.pop(key, None)
        cell["id"] = f"cell-{i:03d}"  # nbformat 4.5 wants ids; random ones would change on every run
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                out.text = _clean_stream(out.text, max_lines)
                if not out.text.strip():
                    continue
            elif out.output_type in ("display_data", "execute_result"):
                for mime in DROP_MIME:
                    if mime in out.data and (mime.startswith("application/vnd") or "image/png" in out.data):
                        out.data.pop(mime)
                if not out.data:
                    continue
                if "text/plain" in out.data and len(out.data) == 1:
                    out.data["text/plain"] = _clean_stream(out.data["text/plain"], max_lines)
                out.metadata = {k: v for k, v in out.get("metadata", {}).items() if k == "image/png"}
            outputs.append(out)
        cell.outputs = outputs
    nb.nbformat_minor = 5
    return nb


def errors(nb) -> list[str]:
    """Error outputs of an executed notebook (``output_type == "error"`` or a traceback on stderr)."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and ERRORS_TEXT.search(out.text):
                found.append(f"cell {i}: traceback in {out.name}")
    return found


def write(nb, path: Path) -> Path:
    import nbformat

    sys.path.insert(0, str(REPO))
    from lib.common.utils import atomic_path

    with atomic_path(path, suffix=".ipynb") as tmp:
        nbformat.write(nb, str(tmp))
    return path


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", choices=run_notebooks.PROFILE_NAMES)
    ap.add_argument("--only", nargs="*", help="two-digit notebook numbers (default: all)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--categories", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", default=None,
                    help="where results/ and figures/ of the run go (default: the repository); the copy still goes "
                         "to notebooks/rendered/<profile>/")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    ap.add_argument("--max-lines", type=int, default=60, help="longest text output kept")
    ap.add_argument("--max-mb", type=float, default=3.0, help="warn when a rendered copy is larger")
    ap.add_argument("--clean-only", action="store_true", help="re-clean the committed copies without running")
    args = ap.parse_args(argv)

    target = RENDERED / args.profile
    todo = run_notebooks.notebooks(args.only)
    if not todo:
        print(f"no notebooks match {args.only}", file=sys.stderr)
        return 2
    params = dict(profile=args.profile, data_root=args.data_root, categories=args.categories, device=args.device,
                  seed=None, out_dir=args.out_dir)
    rows, failed = [], False
    for nb_path in todo:
        out = target / nb_path.name
        t0 = time.perf_counter()
        if args.clean_only:
            if not out.exists():
                continue
            executed = nbformat.read(out, as_version=4)
        else:
            print(f"[render {args.profile}] {nb_path.name}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / nb_path.name
                try:
                    run_notebooks.run_one(nb_path, raw, params, args.timeout, progress=True)
                except SystemExit as err:
                    print(err, file=sys.stderr)
                    rows.append((nb_path.name, "FAILED", time.perf_counter() - t0, 0.0))
                    failed = True
                    continue
                executed = nbformat.read(raw, as_version=4)
        cleaned = clean(executed, args.max_lines)
        problems = errors(cleaned)
        if problems:
            print(f"{nb_path.name}: error outputs, not written: {problems}", file=sys.stderr)
            rows.append((nb_path.name, "ERRORS", time.perf_counter() - t0, 0.0))
            failed = True
            continue
        write(cleaned, out)
        mb = out.stat().st_size / 2**20
        if mb > args.max_mb:
            print(f"warning: {out} is {mb:.1f} MB (> {args.max_mb}): lower figure dpi or print smaller tables",
                  file=sys.stderr)
        rows.append((nb_path.name, "ok", time.perf_counter() - t0, mb))
    print(f"\nrendered ({args.profile} profile) -> {target}")
    for name, status, seconds, mb in rows:
        print(f"  {name:<28} {status:<7} {seconds / 60:6.1f} min {mb:6.2f} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
