"""The README's configuration reference stays true to the settings table."""

from pathlib import Path

from sprox.config import SETTINGS

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_flag_env_and_file_key():
    for setting in SETTINGS:
        assert f"`{setting.name}`" in README or setting.name == "config", setting.name
        if not setting.file_only:
            assert f"`{setting.flag}`" in README, setting.flag
            assert f"`{setting.env}`" in README, setting.env
