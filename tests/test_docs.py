"""The option tables of the docs against the code they describe, so that a new or renamed option fails here first.

docs/training.md's flag table is checked in tests/training/test_train.py, next to the flags.
"""

import inspect
import re

from conftest import REPO_ROOT

from ddim_plus import DDIMSchedulerPlus, ddim_math

CHOICES = {
    "beta_schedule": ddim_math.BETA_SCHEDULES,
    "prediction_type": ddim_math.PREDICTION_TYPES,
    "timestep_spacing": ddim_math.TIMESTEP_SPACINGS,
    "sigma_type": ddim_math.SIGMA_TYPES,
}


def scheduler_option_rows():
    """docs/scheduler.md's "Options" table as {parameter: (default text, meaning text)}."""
    text = (REPO_ROOT / "docs" / "scheduler.md").read_text(encoding="utf-8")
    table = text.split("## Options", 1)[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        names_cell, default_cell, meaning = (cell.strip() for cell in line.strip("|").split("|", 2))
        names = re.findall(r"`(\w+)`", names_cell)
        defaults = [value.strip().strip("`") for value in default_cell.split(",")]
        assert len(names) == len(defaults), f"docs/scheduler.md row {line!r}: one default per parameter"
        for name, default in zip(names, defaults):
            rows[name] = (default, meaning)
    return rows


def test_scheduler_options_table_lists_every_config_parameter_with_its_default():
    parameters = inspect.signature(DDIMSchedulerPlus.__init__).parameters
    expected = {name: p.default for name, p in parameters.items() if name != "self"}
    rows = scheduler_option_rows()
    assert sorted(rows) == sorted(expected), "docs/scheduler.md's Options table and DDIMSchedulerPlus.__init__ differ"
    for name, default in expected.items():
        documented = rows[name][0]
        assert documented.strip('"') == str(default), (
            f"`{name}`: docs/scheduler.md says {documented}, code {default!r}"
        )


def test_scheduler_options_table_names_every_choice():
    rows = scheduler_option_rows()
    for name, choices in CHOICES.items():
        named = re.findall(r'`"(\w+)"`', rows[name][1])
        assert sorted(named) == sorted(choices), f"`{name}` in docs/scheduler.md names {named}, the code {choices}"
