"""The registry of tasks, corruptions and methods (lib/common/registry.py)."""

import pytest

from lib.common import registry as reg


def test_builtin_tasks_and_mvtec_short_names():
    assert reg.task("elpv").loader == "elpv"
    assert reg.task_name("screw") == "mvtec/screw"
    spec = reg.task("screw")
    assert spec.name == "mvtec/screw" and spec.loader == "mvtec" and spec.category == "screw"
    assert spec.paper == ("MVTec", "screw")
    mvtec_ad = [t for t in reg.TASKS if t.startswith("mvtec/") and reg.TASKS[t].paper]  # MVTec 3D-AD tire has none
    assert len(mvtec_ad) == len(reg.MVTEC_CATEGORIES) == 15


def test_ksdd_strips_and_thirds_are_distinct():
    strips, thirds = reg.task("ksdd"), reg.task("ksdd_thirds")
    assert strips.folder == thirds.folder == "ksdd"
    assert not strips.thirds and thirds.thirds
    assert strips.geometry == dict(resize=(448, 160), crop=None)
    assert thirds.paper == ("SDD", None) and strips.paper is None
    # each protocol refuses the other's variant and names the right one
    with pytest.raises(reg.RegistryError, match="ksdd_thirds"):
        reg.task("ksdd", protocol="openset")
    with pytest.raises(reg.RegistryError, match="'ksdd'"):
        reg.task("ksdd_thirds", protocol="roda")
    assert reg.task("elpv", protocol="openset").name == "elpv"


def test_unknown_names_list_known_ones_and_close_matches():
    with pytest.raises(reg.RegistryError) as err:
        reg.task("elvp")
    msg = str(err.value)
    assert "Did you mean 'elpv'" in msg and "headct" in msg and "mvtec/screw" in msg
    with pytest.raises(reg.RegistryError, match="Did you mean 'gaussian_noise'"):
        reg.corruption("gausian_noise")
    with pytest.raises(reg.RegistryError, match="Known: continuous_ot, hungarian, roda, ttac, ttt\\+\\+"):
        reg.method("rodaa", "alignment")
    with pytest.raises(reg.RegistryError, match="Did you mean 'devnet'"):
        reg.method("devnett", "openset")
    with pytest.raises(reg.RegistryError, match="method side"):
        reg.method("roda", "nope")
    assert isinstance(reg.RegistryError("x"), KeyError) and str(reg.RegistryError("x y")) == "x y"


def test_corruptions():
    assert set(reg.PAPER_CORRUPTIONS) <= set(reg.ALL_CORRUPTIONS) and len(reg.ALL_CORRUPTIONS) == 19
    assert reg.corruption("clean") == "clean" and reg.corruption("snow") == "snow"


def test_corruption_list_matches_imagecorruptions():
    imagecorruptions = pytest.importorskip("imagecorruptions")
    assert tuple(imagecorruptions.get_corruption_names("all")) == reg.ALL_CORRUPTIONS


def test_methods_resolve_lazily_to_callables():
    assert reg.method_path("ttt++", "alignment") == "lib.roda.alignment:moment_matching_loss"
    from lib.roda import alignment

    assert reg.method("roda", "alignment") is alignment.roda_loss
    assert reg.method_path("dpdl", "openset") == "lib.dpdl.model:DPDLNet"
    for side in reg.METHOD_TABLES:
        for name in reg.methods(side):
            assert callable(reg.method(name, side)), (side, name)
    with pytest.raises(reg.RegistryError, match="ttac"):
        reg.method("tac", "alignment")


def test_method_names_are_the_modules_own_tables():
    from lib.dpdl import baselines
    from lib.roda import alignment

    assert reg.methods("alignment") == alignment.ALIGNMENT_LOSSES
    assert reg.methods("openset") == baselines.METHODS
    assert reg.methods("alignment") is not alignment.ALIGNMENT_LOSSES  # a copy: callers cannot edit the table


def test_user_folders_by_path(tmp_path):
    mvtec = tmp_path / "my_part"
    (mvtec / "train" / "good").mkdir(parents=True)
    (mvtec / "test" / "good").mkdir(parents=True)
    spec = reg.task(str(mvtec))
    assert spec.loader == "mvtec" and spec.category == "my_part"
    assert reg.task_root(str(mvtec)) == mvtec.resolve().parent
    labelled = tmp_path / "mine"
    labelled.mkdir()
    (labelled / "labels.csv").write_text("path,label\n")
    spec = reg.task(str(labelled))
    assert spec.loader == "labelled" and reg.task_root(str(labelled)) == labelled.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(reg.RegistryError, match="labels.csv"):
        reg.task(str(empty))


def test_task_root_follows_the_data_layout(tmp_path):
    (tmp_path / "mvtec" / "screw").mkdir(parents=True)
    assert reg.task_root("mvtec/screw", tmp_path) == tmp_path / "mvtec"
    assert reg.task_root("mvtec/bottle", tmp_path) == tmp_path  # not under mvtec/: the root itself
    (tmp_path / "ksdd").mkdir()
    (tmp_path / "ksdd" / "labels.csv").write_text("path,label\n")
    assert reg.task_root("ksdd_thirds", tmp_path) == tmp_path / "ksdd"
    assert reg.task_root("headct", tmp_path) == tmp_path
    assert reg.task_root("elpv", tmp_path) is None
    assert reg.task_root("mvtec/screw", None) is None


def test_geometry_per_protocol():
    assert reg.geometry("mvtec/screw") == dict(resize=256, crop=224)
    assert reg.geometry("ksdd") == dict(resize=(448, 160), crop=None)
    assert reg.geometry("ksdd_thirds", "openset", 448) == dict(resize=(448, 448), crop=None)
    with pytest.raises(reg.RegistryError, match="protocol"):
        reg.geometry("elpv", "other")
    # the returned dict is a copy
    reg.geometry("elpv")["resize"] = 1
    assert reg.TASKS["elpv"].geometry["resize"] == 256


def test_bad_loader_kind_is_refused():
    with pytest.raises(ValueError, match="loader"):
        reg.TaskSpec("x", "zip")


def test_extra_corruptions_register_by_dotted_path(monkeypatch):
    monkeypatch.setitem(reg.EXTRA_CORRUPTIONS, "invert", "numpy:invert")
    import numpy as np

    assert reg.corruption("invert") == "invert" and reg.corruption_function("invert") is np.invert
    with pytest.raises(reg.RegistryError, match="Did you mean 'invert'"):
        reg.corruption_function("inverts")
