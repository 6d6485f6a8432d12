"""Library code that the command-line tools of examples/ share, one small module per topic.

A tool is a leaf: it parses flags and calls code from here (as diffusers' scripts call diffusers.training_utils),
never another tool's module. Each module's docstring names the tools that use it.

- cli: the InputError every tool stops with, the --help formatter, the one-line exit on an InputError.
- files: atomic writes, the output-folder policy (prepare_output_folder, check_writable_folder), the settings
  guard of resumable output folders, data files read as tables, whole-file checks of weights and images.
- prompts: prompt sets (named benchmarks, files, dataset columns).
- sampling: loading a text-to-image pipeline and drawing seeded images.
- pair_shards: image-pair datasets written shard by shard (DDSPO's and MaPO's pair tools).
- lm: a local language model that rewrites prompts, and instruction files.
- embeddings: DINOv2 image embeddings.
- runs: generate.py run folders and the score tables beside them.
- calibration: CaPO's calibrated rewards and pair selection.
"""
