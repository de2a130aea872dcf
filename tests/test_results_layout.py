"""results/, figures/ and benchmarks/results/ hold current files only, each table is described in results/README.md,
and every config.json records its folders relative to the repository."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from lib.experiments import profiles

REPO = Path(__file__).resolve().parent.parent
README = REPO / "results" / "README.md"
#: a version tag (v01, v0.5, _v05_), a generation marker, or a round of an earlier measurement
STALE = re.compile(r"(?:^|[/_.-])v\d+(?:\.\d+)*(?=[/_.-]|$)|superseded|_new_|(?:^|[/_.-])round\d", re.IGNORECASE)
PROFILE_WORD = re.compile(r"\b[a-z][a-z_]*\b")


def committed(*folders: str) -> list[str]:
    """The files under ``folders`` that git tracks (the folders' files where there is no git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", *folders], cwd=REPO, capture_output=True, text=True, check=True)
        return sorted(out.stdout.split())
    except (OSError, subprocess.CalledProcessError):
        return sorted(str(p.relative_to(REPO)) for f in folders for p in (REPO / f).rglob("*") if p.is_file())


def readme_rows(text: str) -> list[tuple[set[str], set[str]]]:
    """(table names, profiles) of each row of the README's table: names backticked in the first cell, profiles
    named (outside backticks) in the last."""
    folders = {p.name for p in (REPO / "results").iterdir() if p.is_dir()}
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = set(re.findall(r"`([^`]+\.csv)`", cells[0]))
        where = set(PROFILE_WORD.findall(re.sub(r"`[^`]*`|\([^)]*\)", "", cells[-1]))) & folders
        rows.append((names, where))
    return rows


def test_every_table_is_described_in_the_results_readme():
    rows = readme_rows(README.read_text(encoding="utf-8"))
    listed = {(name, profile) for names, where in rows for name in names for profile in where}
    missing = []
    for path in committed("results"):
        parts = Path(path).parts
        if len(parts) != 3 or not path.endswith(".csv"):
            continue
        _, profile, name = parts
        table = re.sub(r"_timings\.csv$", ".csv", name)  # write_csv's companion of a listed table
        if (name, profile) not in listed and (table, profile) not in listed:
            missing.append(path)
    assert not missing, f"add these tables to results/README.md (name, what writes it, profile, seeds): {missing}"


def test_the_results_readme_names_only_tables_that_exist():
    stale = [f"results/{profile}/{name}" for names, where in readme_rows(README.read_text(encoding="utf-8"))
             for name in names for profile in where if not (REPO / "results" / profile / name).is_file()]
    assert not stale, f"results/README.md lists tables that are not there: {stale}"


def test_no_result_figure_or_benchmark_path_carries_a_version_or_a_generation():
    stale = [p for p in committed("results", "figures", "benchmarks/results") if STALE.search(p)]
    assert not stale, f"only current files under their own names (git history keeps old generations): {stale}"


def test_the_stale_pattern_catches_the_old_names_and_spares_the_current_ones():
    for old in ("results/real_full/05_v04_runs.csv", "results/real_full/05_v05_50x20_elpv.csv", "results/x/v01/a.csv",
                "results/real_full/superseded/05_general.csv", "results/real_full/05_new_headct.csv",
                "benchmarks/results/adapt_step_v03.txt", "benchmarks/results/profile_after_round1.txt"):
        assert STALE.search(old), old
    for current in ("results/real_full/05_general_M10.png", "benchmarks/results/adapt_step_cuda_h200.txt",
                    "results/dev/bn_gate_elpv.csv", "results/real_full/08_roda_grid_vs_adabn_matched.csv"):
        assert not STALE.search(current), current


@pytest.mark.parametrize("path", sorted((REPO / "results").glob("*/config.json")), ids=lambda p: p.parent.name)
def test_committed_config_describes_its_profile_with_folders_relative_to_the_repository(path):
    config = json.loads(path.read_text(encoding="utf-8"))
    assert config["name"] == path.parent.name
    for key in (*profiles.WHERE, "data_root"):
        value = config.get(key)
        assert value is None or not Path(value).is_absolute(), f"{path}: {key} = {value}"
    assert config["results_dir"] == f"results/{path.parent.name}"


def test_save_config_records_folders_relative_to_the_repository(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(profiles, "REPO_ROOT", repo)
    cfg = profiles.get_profile("smoke", device="cpu", out_dir=repo, data_root=tmp_path / "shared" / "data")
    saved = json.loads((repo / "results" / "smoke" / "config.json").read_text())
    assert saved["results_dir"] == "results/smoke" and saved["cache_dir"] == "cache/smoke"
    assert saved["figures_dir"] == "figures/smoke" and saved["generated_root"] == "cache/data"
    assert saved["data_root"] == "../shared/data"
    assert Path(cfg.results_dir).is_absolute()  # the run itself still writes where it was told
    assert profiles.recorded_path(tmp_path / "runs") == "../runs"  # beside the checkout
    assert profiles.recorded_path(Path("/elsewhere/runs")) == "/elsewhere/runs"  # a folder named outside: as given
    assert profiles.recorded_path("relative/x") == "relative/x" and profiles.recorded_path(None) is None
