"""Getting promptseg from its repository the FiftyOne way: the remote zoo model source
(`foz.register_zoo_model_source(<repository>)`, then `foz.load_zoo_model("promptseg/sam3", ...)`
gives `PromptsegModel` for `apply_model`) and `fiftyone plugins download`.

FiftyOne downloads a repository as an archive and looks for ``manifest.json`` (zoo) and
``fiftyone.yml`` (plugin) files in it. Here the archive is built from this repository's own plugin
folder, laid out as GitHub serves it, and served from 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from fo_helpers import assert_matches_core
from stand_ins import StandInHub, pointed_at, serve_folder

PROMPTS = ["red square", "green square"]
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "fiftyone"
NAME = "promptseg/sam3"


def _repository_archive(path: Path) -> Path:
    """The plugin folder zipped as GitHub's archive of the repository holds it."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(PLUGIN_DIR.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                archive.write(file, Path("promptseg-main", "plugins", "fiftyone", file.relative_to(PLUGIN_DIR)))
    return path


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    _repository_archive(folder / "promptseg-main.zip")
    return folder


@pytest.fixture(scope="module")
def zoo_source(fo, archive_dir):
    """This repository registered as a zoo model source (from a local archive URL); its URL."""
    import fiftyone.zoo as foz

    with serve_folder(archive_dir) as url:
        source = f"{url}/promptseg-main.zip"
        foz.register_zoo_model_source(source)
    yield source
    foz.delete_zoo_model_source(source)


def _download(monkeypatch, model: str) -> None:
    import fiftyone.zoo as foz

    monkeypatch.setenv("PROMPTSEG_MODEL", model)
    foz.download_zoo_model(NAME, overwrite=True)


def test_registered_source_lists_the_model_and_loads_promptseg_model_for_apply_model(
        fo, zoo_source, dataset, tiny_sam3_dir, fo_segmenter, monkeypatch):
    import fiftyone.zoo as foz

    import promptseg
    from promptseg_fiftyone import PromptsegModel

    assert zoo_source in foz.list_zoo_model_sources()
    assert NAME in foz.list_zoo_models(source=zoo_source)
    _download(monkeypatch, str(tiny_sam3_dir))
    record = Path(foz.find_zoo_model(NAME))
    assert record.parent == Path(fo.config.model_zoo_dir) / "promptseg-zoo"  # the manifest's name
    assert json.loads(record.read_text()) == {"model": str(tiny_sam3_dir.resolve())}
    monkeypatch.delenv("PROMPTSEG_MODEL")  # loading reads the record; nothing is downloaded again
    model = foz.load_zoo_model(NAME, prompts=PROMPTS, device="cpu", threshold=0.0, cache=False)
    assert isinstance(model, PromptsegModel)
    assert sys.modules["promptseg"] is promptseg  # the zoo's module does not take the core's name
    dataset.apply_model(model, label_field="zoo")
    for sample in dataset:
        assert_matches_core(sample["zoo"], fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))
    assert dataset.get_field("zoo").document_type is fo.Detections


def test_download_fetches_gated_hub_weights_with_the_users_token_and_says_how_to_get_access(
        fo, zoo_source, tiny_sam3_dir, tmp_path, monkeypatch):
    import fiftyone.zoo as foz
    from huggingface_hub import constants

    from promptseg.errors import ModelLoadError

    repo, token = "promptseg-test/tiny-sam3", "hf_zooToken42"
    with StandInHub(tiny_sam3_dir, repo, token) as hub, pointed_at(monkeypatch, hub, tmp_path / "hf-cache"):
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(ModelLoadError) as refused:
            _download(monkeypatch, repo)
        assert f"Access to {repo} is refused (gated repository)" in str(refused.value)
        assert "set HF_TOKEN" in str(refused.value) and "PROMPTSEG_MODEL" in str(refused.value)

        monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)  # the user's own login or HF_TOKEN
        monkeypatch.setenv("HF_TOKEN", token)
        _download(monkeypatch, repo)
        model = foz.load_zoo_model(NAME, prompts=PROMPTS, device="cpu", cache=False)
    assert model.segmenter.describe()["model_id"].startswith(f"hub:{repo}@")
    assert f"Bearer {token}" in hub.authorizations


def test_a_name_the_source_does_not_have_is_refused(fo, zoo_source):
    import fiftyone.zoo as foz

    with pytest.raises(ValueError, match="Model 'promptseg/sam4' not found in the zoo"):
        foz.load_zoo_model("promptseg/sam4")


def test_a_missing_model_directory_fails_the_download_naming_the_fix(fo, zoo_source, tmp_path, monkeypatch):
    from promptseg.errors import ModelLoadError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as excinfo:
        _download(monkeypatch, str(missing))
    message = str(excinfo.value)
    assert f"No model directory at {missing}" in message
    assert "Set PROMPTSEG_MODEL to a hub id or to a local model directory" in message


def test_a_recorded_directory_that_is_gone_fails_the_load_naming_the_fix(
        fo, zoo_source, tiny_sam3_dir, tmp_path, monkeypatch):
    import fiftyone.zoo as foz

    from promptseg.errors import ModelLoadError

    copy = Path(shutil.copytree(tiny_sam3_dir, tmp_path / "moved-away"))
    _download(monkeypatch, str(copy))
    shutil.rmtree(copy)
    with pytest.raises(ModelLoadError) as excinfo:
        foz.load_zoo_model(NAME, prompts=PROMPTS, device="cpu", cache=False)
    message = str(excinfo.value)
    assert f"The zoo model {NAME} cannot load {copy}" in message
    assert f"foz.download_zoo_model('{NAME}', overwrite=True)" in message
    # the directory named at load time is used instead of the recorded one
    assert foz.load_zoo_model(NAME, model=str(tiny_sam3_dir), prompts=PROMPTS, device="cpu", cache=False)


def test_plugins_download_installs_the_plugin_with_its_requirements_and_zoo_source(fo, archive_dir, tmp_path,
                                                                                   monkeypatch):
    """`fiftyone plugins download <repository> --plugin-names @promptseg/fiftyone`, into an empty plugins dir."""
    import fiftyone.plugins as fop

    monkeypatch.setattr(fo.config, "plugins_dir", str(tmp_path / "plugins"))
    with serve_folder(archive_dir) as url:
        installed = fop.download_plugin(f"{url}/promptseg-main.zip", plugin_names=["@promptseg/fiftyone"])
    folder = Path(installed["@promptseg/fiftyone"])
    assert folder.is_relative_to(tmp_path / "plugins")
    assert [p.name for p in fop.list_plugins()] == ["@promptseg/fiftyone"]
    assert fop.get_plugin("@promptseg/fiftyone").directory == str(folder)
    assert fop.load_plugin_requirements("@promptseg/fiftyone") == ["promptseg>=0.1"]
    assert (folder / "zoo" / "manifest.json").is_file() and (folder / "fiftyone.yml").is_file()
