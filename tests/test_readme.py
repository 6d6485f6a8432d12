"""The README documents every flag of every training script, and its commands name real files."""

import re
from pathlib import Path

import pytest

import train_capo
import train_ddspo
import train_diffusion_dpo_sdxl
import train_mapo_sdxl


REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


ACCELERATE_LAUNCH_FLAGS = {
    "--num_processes",
    "--num_machines",
    "--multi_gpu",
    "--config_file",
    "--main_process_port",
    "--dynamo_backend",
    "--use_deepspeed",
    "--use_fsdp",
}


def option_strings(script):
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, [], namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return [
        action.option_strings[0]
        for action in captured["parser"]._actions
        if action.option_strings and action.dest != "help"
    ]


SCRIPTS = [train_diffusion_dpo_sdxl, train_mapo_sdxl, train_ddspo, train_capo]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_every_flag_is_documented_in_the_readme(script):
    missing = [flag for flag in option_strings(script) if f"`{flag}`" not in README]
    assert not missing, f"README.md does not document {missing}"


@pytest.mark.parametrize("readme", ["README.md", "examples/eval/README.md", "examples/capo/README.md"])
def test_flags_used_in_training_commands_exist(readme):
    known = set().union(*(option_strings(script) for script in SCRIPTS)) | ACCELERATE_LAUNCH_FLAGS
    for block in re.findall(r"```bash\n(.*?)```", (REPO / readme).read_text(), flags=re.S):
        for command in block.split("\n\n"):
            if "train_" not in command:
                continue
            flags = set(re.findall(r"(?<![\w-])(--[a-z0-9_]+)", command))
            assert flags <= known, f"unknown flags {flags - known} in README command:\n{command}"


def test_files_named_in_the_two_commands_exist():
    for path in (
        "examples/tiny_world/run_demo.sh",
        "tests/run_tests.sh",
        "examples/setup_env.sh",
        "examples/tiny_world/make_tiny_assets.py",
    ):
        assert (REPO / path).exists() and path in README


DOCUMENTS = ["README.md", "requirements.txt", "examples/eval/README.md", "train_diffusion_dpo_sdxl.py"]
DOCUMENTS += ["train_mapo_sdxl.py", "utils/diffusion.py", "tests/run_tests.sh", "examples/setup_env.sh"]
DOCUMENTS += ["train_ddspo.py", "examples/ddspo/README.md", "examples/capo/README.md", "train_capo.py"]
DOCUMENTS += ["examples/mapo/README.md", "examples/mapo/MISMATCH.md"]


def test_every_repository_file_the_docs_point_to_exists():
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        assert "../shared" not in text, f"{document} points outside the repository"
        paths = re.findall(
            r"(?<![\w./-])((?:docs|examples|tests|utils|scripts)/[\w./-]*\w\.(?:md|py|sh|txt|yaml))", text
        )
        missing = sorted({path for path in paths if not (REPO / path).exists()})
        assert not missing, f"{document} names {missing}, which the repository does not have"


def test_readme_names_validation_images_as_the_scripts_write_them():
    names = re.findall(r"validation/(step-[^`\s),]+)", README)
    assert names and all(re.fullmatch(r"step-\d{6}\.png", name) for name in names), names
