"""`make run` crosses every reducer `available(images=True)` lists with `keep` budgets on ref-llava-e2e's images."""
import re
from pathlib import Path

from tokenomy.reducers import available, build_plan
from tokenomy.reducers.registry import registered


def test_make_run_lists_exactly_the_reducers_that_take_an_image_budget():
    names = available(images=True)
    left_out = set(available()) - set(names)
    assert left_out == {name for name, cls in registered().items() if not cls.reduces_images}
    assert "seats" in left_out and {"none", "random", "fastv", "flowcut"} <= set(names)
    for name in names:
        plan = build_plan(name, keep=16)  # what `tokenomy eval --reducers ... --keep 16` builds before the model loads
        assert plan.stages


def test_make_run_asks_for_that_list():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    run_recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"available\(images=True\)", run_recipe)
