"""The README documents every flag of every training script, and its commands name real files."""

import re
from pathlib import Path

import pytest

import train_capo
import train_capo_sd3
import train_ddspo
import train_ddspo_sd3
import train_diffusion_dpo_sd3
import train_diffusion_dpo_sdxl
import train_mapo_personalization_sdxl
import train_mapo_sd3
import train_mapo_sdxl


REPO = Path(__file__).resolve().parents[2]
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


class _Captured(Exception):
    pass


def option_strings(script):
    """The flags of a training script's parser, captured at its parse_args call (nothing is parsed)."""
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return [
        action.option_strings[0]
        for action in captured["parser"]._actions
        if action.option_strings and action.dest != "help"
    ]


SCRIPTS = [
    train_diffusion_dpo_sdxl,
    train_diffusion_dpo_sd3,
    train_mapo_sdxl,
    train_mapo_sd3,
    train_mapo_personalization_sdxl,
    train_ddspo,
    train_capo,
    train_capo_sd3,
    train_ddspo_sd3,
]


# Each script's flags are documented in its guide, or in docs/TRAINING.md for the flags all scripts share.
GUIDES = {
    "train_diffusion_dpo_sdxl": "examples/dpo/README.md",
    "train_diffusion_dpo_sd3": "examples/dpo/README.md",
    "train_mapo_sdxl": "examples/mapo/README.md",
    "train_mapo_sd3": "examples/mapo/README.md",
    "train_mapo_personalization_sdxl": "examples/mapo/README.md",
    "train_ddspo": "examples/ddspo/README.md",
    "train_ddspo_sd3": "examples/ddspo/README.md",
    "train_capo": "examples/capo/README.md",
    "train_capo_sd3": "examples/capo/README.md",
}
SHARED_FLAGS = "docs/TRAINING.md"
# Every document whose commands a user copies: the README test covers the commands of all of them.
MARKDOWN = ["README.md", SHARED_FLAGS, "tests/README.md", "examples/mapo/MISMATCH.md"]
MARKDOWN += sorted(str(path.relative_to(REPO)) for path in (REPO / "examples").glob("*/README.md"))
FLAG = r"(?<![\w-])(--[a-z0-9_]+)"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_every_flag_is_documented_in_the_scripts_guide(script):
    documented = (REPO / GUIDES[script.__name__]).read_text() + (REPO / SHARED_FLAGS).read_text()
    missing = [flag for flag in option_strings(script) if f"`{flag}`" not in documented]
    assert not missing, f"neither {GUIDES[script.__name__]} nor {SHARED_FLAGS} documents {missing}"


def commands(document):
    """The shell commands of a document's bash blocks, continuation lines joined."""
    for block in re.findall(r"```bash\n(.*?)```", (REPO / document).read_text(), flags=re.S):
        yield from (command for command in block.replace("\\\n", " ").split("\n") if command.strip())


def tool_flags(module):
    """The flags of a tool's parser, captured when its entry point parses (nothing runs past that)."""
    import importlib

    assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"no tool {module}"
    tool = importlib.import_module(module)
    entry = getattr(tool, "parse_args", None) or tool.main
    return set(option_strings(type("Tool", (), {"parse_args": staticmethod(lambda argv: entry(argv))})))


@pytest.mark.parametrize("document", MARKDOWN)
def test_every_command_names_a_real_script_or_tool_and_its_flags(document):
    known = set().union(*(option_strings(script) for script in SCRIPTS)) | ACCELERATE_LAUNCH_FLAGS
    for command in commands(document):
        command = command.split("#", 1)[0]
        flags = set(re.findall(FLAG, command))
        tool = re.search(r"(?:python|accelerate launch)\b[^|;&]*?-m (examples(?:\.\w+)+)", command)
        if tool:
            unknown = flags - tool_flags(tool.group(1)) - ACCELERATE_LAUNCH_FLAGS - {"--help"}
            assert not unknown, f"{document}: {tool.group(1)} has no {sorted(unknown)}:\n{command}"
        elif re.search(r"\btrain_\w+\.py", command):
            script = re.search(r"\b(train_\w+)\.py", command).group(1)
            assert (REPO / f"{script}.py").exists(), f"{document}: no {script}.py:\n{command}"
            assert flags <= known, f"{document}: unknown flags {flags - known} in:\n{command}"
        assert not re.search(r"python3? examples/", command), f"{document}: run tools as modules:\n{command}"


def test_files_named_in_the_two_commands_exist():
    for path in (
        "examples/tiny_world/run_demo.sh",
        "tests/run_tests.sh",
        "examples/setup_env.sh",
        "examples/tiny_world/make_tiny_assets.py",
    ):
        assert (REPO / path).exists() and path in README


DOCUMENTS = [*MARKDOWN, "requirements.txt", "train_diffusion_dpo_sdxl.py"]
DOCUMENTS += ["train_mapo_sdxl.py", "utils/diffusion.py", "tests/run_tests.sh", "examples/setup_env.sh"]
DOCUMENTS += ["train_mapo_personalization_sdxl.py"]
DOCUMENTS += ["train_ddspo.py", "train_capo.py", "train_diffusion_dpo_sd3.py", "train_mapo_sd3.py"]
DOCUMENTS += ["train_capo_sd3.py", "train_ddspo_sd3.py"]


def test_every_repository_file_the_docs_point_to_exists():
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        assert "../shared" not in text, f"{document} points outside the repository"
        paths = re.findall(
            r"(?<![\w./-])((?:docs|examples|tests|utils|scripts)/[\w./-]*\w\.(?:md|py|sh|txt|yaml))", text
        )
        missing = sorted({path for path in paths if not (REPO / path).exists()})
        assert not missing, f"{document} names {missing}, which the repository does not have"


@pytest.mark.parametrize("document", MARKDOWN)
def test_every_relative_link_resolves(document):
    folder = (REPO / document).parent
    targets = re.findall(r"\]\((?!https?:|#)([^)#\s]+)", (REPO / document).read_text())
    missing = sorted({target for target in targets if not (folder / target).exists()})
    assert not missing, f"{document} links to {missing}, which do not exist"


def test_readme_names_validation_images_as_the_scripts_write_them():
    names = re.findall(r"validation/(step-[^`\s),]+)", (REPO / SHARED_FLAGS).read_text())
    assert names and all(re.fullmatch(r"step-\d{6}\.png", name) for name in names), names
