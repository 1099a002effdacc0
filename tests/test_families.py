"""The family declarations (`stadi_xdit/families/`): what they declare, and that nothing else needs to."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stadi_xdit.families import conformance_cases, families, family, hub_models

ROOT = Path(__file__).resolve().parents[1]


def test_the_declarations_import_without_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules['torch'] = None  # any `import torch` now raises ImportError
        sys.modules['xfuser'] = None
        from stadi_xdit.families import families, hub_models, example_choices
        from stadi_xdit.offline.hub_cache import HUB_MODELS
        print(sorted(spec.name for spec in families()), sorted(example_choices()), sorted(HUB_MODELS))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    runtimes = sorted(p.stem for p in (ROOT / "stadi_xdit" / "models").glob("*.py") if p.stem != "__init__")
    assert result.stdout.startswith(str(runtimes)), result.stdout  # a family per runtime module, no other


def test_every_declaration_names_a_runtime_module_with_its_twins():
    from stadi_xdit.registry import twins

    registered = {twin.__module__ for twin in twins().values()}
    assert registered == {spec.runtime for spec in families()}
    for spec in families():
        assert (ROOT / "stadi_xdit" / "families" / f"{spec.name}.py").is_file()
        assert "tiny" in spec.presets
    cases = conformance_cases()  # every twin has a conformance case with an odd number of token rows
    assert set(cases) == {twin.__name__ for twin in twins().values()}
    assert all(case.rows % 2 == 1 and case.twin_class().__name__ == name for name, case in cases.items())


def test_every_twin_declares_how_its_positions_reach_a_band():
    """A twin's injection plan says where its positions come from (xdit/injection.py), so no family codes its
    own holder of the band's range (tests/test_layering.py::test_a_bands_position_has_one_holder)."""
    from stadi_xdit.registry import twins
    from stadi_xdit.xdit.injection import PatchEmbedPositions, RopeSwap, SlicedPositions

    kinds = {twin.__name__: type(twin.injection_plan.positions) for twin in twins().values()}
    assert all(kind in (PatchEmbedPositions, SlicedPositions, RopeSwap) for kind in kinds.values()), kinds
    sliced = [twin.injection_plan.positions.sliced_by for twin in twins().values()
              if isinstance(twin.injection_plan.positions, SlicedPositions)]
    assert all(sliced), "a SlicedPositions names the code that slices"


def test_names_are_unique_across_families():
    runner_models = [hub.runner_model for spec in families() for hub in spec.hub_models]
    choices = [choice.pipeline for spec in families() for choice in spec.examples]
    assert len(set(runner_models)) == len(runner_models) and len(set(choices)) == len(choices)
    assert set(hub_models()) == set(runner_models)
    with pytest.raises(KeyError, match="no model family 'nope'"):
        family("nope")


@pytest.mark.parametrize("spec", families(), ids=lambda spec: spec.name)
def test_example_wrappers_resolve_to_xfuser_wrappers_with_a_twin(spec):
    from stadi_xdit.registry import twin_for

    for choice in spec.examples:
        wrapper = choice.wrapper_class()
        assert wrapper.__name__.startswith("xFuser")
        assert twin_for(wrapper.__name__).__module__ == spec.runtime


def test_runner_models_match_xdit_and_are_served_by_the_declaring_family():
    from xfuser.model_executor.models.runner_models import base_model

    from stadi_xdit.registry import twin_for_runner_model

    for spec in families():
        for hub in spec.hub_models:
            model_cls = base_model.MODEL_REGISTRY[hub.runner_model]
            assert model_cls.settings.model_name == hub.repo_id
            assert twin_for_runner_model(model_cls.__name__).__module__ == spec.runtime


@pytest.mark.parametrize("spec", [s for s in families() if s.bench], ids=lambda spec: spec.name)
def test_bench_presets_are_the_family_model_presets_it_declares(spec):
    from stadi_xdit.bench.presets import BenchPreset, get_preset

    for name, shape in spec.bench.shapes.items():
        preset = get_preset(name)
        assert isinstance(preset, BenchPreset) and preset.family == spec.name
        assert preset.spec is spec.presets[shape.model or name]
        assert shape.variant in spec.bench.xdit_wrappers
