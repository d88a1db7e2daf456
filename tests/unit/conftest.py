"""Fixtures the unit tests share: model folders made once per session by `ftlaunch model make`."""

import shutil

import pytest


@pytest.fixture(scope="session")
def made_model(tmp_path_factory):
    """`made_model(family, dest=None)`: the folder `launcher.modelmake.make_model(family)` writes,
    made once per session; with `dest`, a private copy there (to break it in a test)."""
    from launcher.modelmake import make_model

    made = {}

    def get(family="qwen2", dest=None):
        if family not in made:
            made[family] = make_model(family, tmp_path_factory.mktemp("models") / family)
        if dest is None:
            return made[family]
        shutil.copytree(made[family], dest)
        return dest

    return get
