"""VQAScore (Lin et al. 2024) through the optional `t2v_metrics` package.

VQAScore is P("Yes" | image, 'Does this figure show "{prompt}"? Please answer yes or no.') from
CLIP-FlanT5-XXL (CaPO Eq. 27); a probability, so CaPO turns two scores into a preference with
Eq. 28 rather than a sigmoid. `t2v_metrics` pins its own torch/transformers versions and the model
is an 11B-parameter download, so it is never a requirement of this repository: install it in a
separate environment (`pip install t2v-metrics`) and run `examples/eval/score.py --reward_models vqascore`
there. Precision and weights are `t2v_metrics`' own; `dtype` is recorded but not applied.
"""

import tempfile
from pathlib import Path

import torch

from .base import RewardModel


DEFAULT_VQASCORE_MODEL = "clip-flant5-xxl"
MISSING_T2V_METRICS = (
    "VQAScore needs the optional package `t2v_metrics`, which is not installed. It pins its own torch and "
    "transformers versions, so install it in a separate environment (`pip install t2v-metrics`) and run "
    "score.py there, or leave vqascore out of --reward_models."
)


class VQAScore(RewardModel):
    name = "vqascore"
    display_name = "VQAScore"
    kind = "probability"
    optional_dependency = "t2v_metrics"
    missing_dependency_message = MISSING_T2V_METRICS

    @classmethod
    def weights_source(cls, path=None):
        """t2v_metrics downloads and caches its own weights; the model name is all we can record."""
        return [{"t2v_metrics": path or DEFAULT_VQASCORE_MODEL}]

    def __init__(self, path=None, device=None, dtype=torch.float32, batch_size=16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        try:
            import t2v_metrics
        except ImportError as error:
            raise ImportError(MISSING_T2V_METRICS) from error
        self.path = path or DEFAULT_VQASCORE_MODEL
        self.model = t2v_metrics.VQAScore(model=self.path, device=str(self.device))

    def _score_batch(self, images, prompts):
        scores = torch.empty(len(images))
        # t2v_metrics scores every image against every text; one call per prompt keeps it to the pairs we need.
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for i, image in enumerate(images):  # older t2v_metrics releases read images from paths only
                paths.append(str(Path(folder) / f"{i}.png"))
                image.save(paths[-1])
            for prompt in dict.fromkeys(prompts):
                indices = [i for i, p in enumerate(prompts) if p == prompt]
                result = self.model(images=[paths[i] for i in indices], texts=[prompt])  # (len(indices), 1)
                scores[indices] = result.reshape(-1).float().cpu()
        return scores
