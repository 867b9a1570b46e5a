import diffusers

import ddim_plus


def test_import_registers_scheduler_on_diffusers():
    assert diffusers.DDIMSchedulerPlus is ddim_plus.DDIMSchedulerPlus
