"""What a run tells its user is true: each phase's own peak memory, and step counts that read right."""

import numpy as np
import pytest
import torch

import train_capo
import train_capo_sd3
import train_ddspo
import train_ddspo_sd3
import train_diffusion_dpo_sd3
import train_diffusion_dpo_sdxl
import train_mapo_personalization_sdxl
import train_mapo_sd3
import train_mapo_sdxl


SCRIPTS = [train_diffusion_dpo_sdxl, train_mapo_sdxl, train_mapo_personalization_sdxl, train_ddspo, train_capo]
SCRIPTS += [train_diffusion_dpo_sd3, train_mapo_sd3, train_capo_sd3, train_ddspo_sd3]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_each_phase_reports_its_own_peak_memory_not_the_whole_processes(script):
    memory = script.PeakMemory(torch.device("cpu"))
    memory.switch("cache_build")
    block = np.ones(512 * 2**20 // 8)  # 512 MiB written, then freed: numpy maps it, so it goes back to the OS
    del block
    memory.switch("training")
    block = np.ones(2**20 // 8)
    del block
    memory.switch(None)
    assert memory.kind == "rss"
    assert memory.peaks["cache_build"] - memory.peaks["training"] > 400 * 2**20, memory.peaks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_step_counts_read_as_english(script):
    assert script.steps(1) == "1 optimizer step" and script.steps(4) == "4 optimizer steps"
