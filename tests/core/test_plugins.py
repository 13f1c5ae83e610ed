"""Discovery through entry points, failure isolation, duplicates, the opt-out variable."""

from __future__ import annotations

import json

import pytest

from music_interpret.plugins import PluginRegistry
from tests.conftest import make_distribution, run_cli
from tests.core.toyplugin import BROKEN_PLUGIN, DUPLICATE_PLUGIN, TOY_PLUGIN


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    make_distribution(site, "mi-toy", {"mi_toy_plugin": TOY_PLUGIN}, {"toy": "mi_toy_plugin"})
    make_distribution(site, "mi-broken", {"mi_broken_plugin": BROKEN_PLUGIN},
                      {"broken": "mi_broken_plugin"}, version="0.3")
    make_distribution(site, "mi-zdup", {"mi_dup_plugin": DUPLICATE_PLUGIN}, {"dup": "mi_dup_plugin"})
    return site


def _rows(site):
    result = run_cli("plugins", "--json", site=site)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_builtins_are_discovered_through_entry_points():
    registry = PluginRegistry(autoload=False)
    mmt = [i for i in registry.infos if i.name == "mmt"]
    assert mmt and mmt[0].kind == "model_adapter"
    assert mmt[0].distribution == "music-interpret"
    assert mmt[0].entry_point == "mmt" and mmt[0].status == "loaded"


def test_third_party_plugin_found_and_broken_one_reported(site):
    rows = _rows(site)
    by = {(r["distribution"], r["name"]): r for r in rows}
    toy = by[("mi-toy", "toy_sae")]
    assert toy["status"] == "loaded" and toy["kind"] == "dictionary_learner"
    assert toy["version"] == "1.0.0" and toy["description"] == "A toy dictionary learner for tests."
    assert by[("mi-toy", "count")]["kind"] == "stage"
    broken = by[("mi-broken", "broken")]
    assert broken["status"] == "failed"
    assert "this_module_does_not_exist" in broken["error"]
    assert broken["version"] == "0.3"
    # the built-ins still load
    assert by[("music-interpret", "mmt")]["status"] == "loaded"


def test_duplicate_name_fails_only_the_duplicate(site):
    rows = _rows(site)
    dup = [r for r in rows if r["distribution"] == "mi-zdup"]
    statuses = {r["name"]: r for r in dup}
    assert statuses["fine_sae"]["status"] == "loaded"
    assert statuses["toy_sae"]["status"] == "failed"
    assert "duplicate dictionary_learner name 'toy_sae'" in statuses["toy_sae"]["error"]
    assert "mi-toy" in statuses["toy_sae"]["error"]


def test_table_output_names_failures(site):
    result = run_cli("plugins", site=site)
    assert result.returncode == 0
    line = next(li for li in result.stdout.splitlines() if li.split()[1:2] == ["broken"])
    assert "failed: ModuleNotFoundError" in line


def test_autoload_can_be_disabled(site):
    result = run_cli("plugins", "--json", site=site,
                     env={"MUSIC_INTERPRET_DISABLE_PLUGIN_AUTOLOAD": "1"})
    dists = {r["distribution"] for r in json.loads(result.stdout)}
    assert dists == {"music-interpret"}


def test_invalid_plugin_class_is_reported(tmp_path):
    source = (
        "from music_interpret.hookspecs import hookimpl\n"
        "class NotAPlugin:\n    name = 'x'\n"
        "@hookimpl\ndef mi_analyzers():\n    return [NotAPlugin]\n"
    )
    site = make_distribution(tmp_path / "s", "mi-bad-class", {"mi_bad_class": source}, {"bad": "mi_bad_class"})
    rows = [r for r in _rows(site) if r["distribution"] == "mi-bad-class"]
    assert rows[0]["status"] == "failed" and "not a music_interpret plugin class" in rows[0]["error"]


def test_hook_that_raises_is_reported(tmp_path):
    source = (
        "from music_interpret.hookspecs import hookimpl\n"
        "@hookimpl\ndef mi_analyzers():\n    raise RuntimeError('boom')\n"
    )
    site = make_distribution(tmp_path / "s", "mi-raises", {"mi_raises": source}, {"r": "mi_raises"})
    rows = [r for r in _rows(site) if r["distribution"] == "mi-raises"]
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "RuntimeError: boom"
