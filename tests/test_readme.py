"""The README's quick start runs as written, with the Hub checkpoint replaced by a local stock DDPM folder."""

import re

from conftest import REPO_ROOT, make_tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

import ddim_plus

README = REPO_ROOT / "README.md"


def test_readme_quick_start_runs_on_a_stock_ddpm_checkpoint(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    repo_id = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    ddpm_folder = tmp_path / "ddpm"
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(ddpm_folder)
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(code.replace(repo_id, str(ddpm_folder)), namespace)

    assert isinstance(namespace["pipe"].scheduler, ddim_plus.DDIMSchedulerPlus)
    assert namespace["pipe"].scheduler.config.timestep_spacing == "logsnr"
    assert namespace["pipe"].scheduler.config.ddim_solver_order == 2
    assert len(namespace["images"]) == 4 and namespace["images"][0].size == (8, 8)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "my-ddim")
    assert isinstance(reloaded, ddim_plus.DDIMPlusPipeline)
    assert reloaded.scheduler.config.timestep_spacing == "logsnr"
    assert reloaded.scheduler.config.ddim_solver_order == 2
