"""README's "Recipe components" table against configs/recipes.py: a row per component in the order the recipes apply
them, and each row's recipe list equal to the registry's recipes holding that component."""
import pathlib
import re

from configs.recipes import COMPONENTS, FAMILY_COMPONENTS, FAMILY_EXTRAS, FAMILY_ROTATIONS, RECIPES

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SUFFIX = "_config_llama"


def _table_rows() -> dict[str, str]:
    """component name -> its 'recipes' cell, in the README's order."""
    text = README.read_text()
    section = text.split("## Recipe components", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9]+)` \| .* \| (.*) \|$", section, flags=re.MULTILINE)
    return dict(rows)


def _recipes_with(component: str) -> set[str]:
    recipes = (name.removesuffix(SUFFIX) for name in RECIPES)
    return {recipe for recipe in recipes if component in recipe.split("_")[1:]}


def test_the_table_has_every_component_in_the_order_they_apply():
    assert list(_table_rows()) == list(COMPONENTS)


def test_listed_recipes_are_exactly_those_holding_the_component():
    combination_components = ({c for own in FAMILY_COMPONENTS.values() for c in own}
                              | {c for extras in FAMILY_EXTRAS.values() for c in extras}
                              | {c for rotations in FAMILY_ROTATIONS.values() for c in rotations} | {"fpends"})
    for component, cell in _table_rows().items():
        if cell == "combinations":
            assert component in combination_components, component
        else:
            assert component not in combination_components, component
            assert set(re.findall(r"`([A-Za-z0-9_]+)`", cell)) == _recipes_with(component), component


def test_the_check_reads_a_real_list():
    assert _recipes_with("shared") == {"NVFP4_shared", "NVFP4_4over6_search_gptq_shared"}
    assert len(_table_rows()) >= 15
