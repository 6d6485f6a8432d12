"""Files of runs: atomic writes, the output-folder policy, the settings guard of a resumable folder, data files read
as tables, and whether a weight file or an image is whole.

Used by every tool that writes an output folder (prepare_output_folder: a folder of whole outputs, refused when it
holds an earlier run's unless --overwrite; check_writable_folder: a resumable one), by those that read a dataset
given as a folder, a hub id or one data file (ddspo/generate_pairs.py, mapo/measure_mismatch.py), and by those that
read weights or images another run wrote (check_safetensors, image_problem: eval/generate.py, capo/soup.py,
mapo/build_pairs.py, lib/runs.py).
"""

import json
import os
from pathlib import Path

from examples.lib.cli import InputError


# datasets' builder for each data file a tool reads as a table
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def temporary_path(path):
    """Where `path` is written before it is renamed into place: hidden (a leading dot) in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path, write):
    """`write(temporary_path)`, then rename it to `path`: a crash leaves the old file or none, never half a file."""
    temporary = temporary_path(path)
    write(temporary)
    os.replace(temporary, path)


OVERWRITE_HELP = "Replace the outputs an earlier run left in the output folder (they are deleted first)."


def earlier_outputs(folder, patterns):
    """The names in `folder` that match one of `patterns` (globs of what the tool writes there), sorted."""
    return sorted({path.name for pattern in patterns for path in Path(folder).glob(pattern)})


def check_writable_folder(folder, flag="--output_dir"):
    """Refuse, without creating anything, a `folder` that is a file or could not be created or written: the check of
    a resumable tool's folder, which is made when the work starts (see prepare_output_folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {str(folder)!r} is a file; give a folder (it is created if missing).")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {str(folder)!r} cannot be written ({str(existing)!r} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(folder)!r} cannot be written (no write permission on {str(existing)!r}).")


def prepare_output_folder(folder, patterns, overwrite=False, flag="--output_dir", remedy=None):
    """Make `folder` ready to be written before any work: refuse a file, a folder holding an earlier run's outputs
    (names matching `patterns`) unless `overwrite` (then they are deleted), and a folder that cannot be written.

    Raises InputError with one line that says what is there and how to go on (`remedy`, default: a new folder or
    --overwrite)."""
    import shutil

    folder = Path(folder)
    check_writable_folder(folder, flag)
    found = earlier_outputs(folder, patterns) if folder.is_dir() else []
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        remedy = remedy or f"Give a new {flag}, or pass --overwrite to replace them."
        raise InputError(f"{flag} {str(folder)!r} holds an earlier run's outputs ({shown}). {remedy}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{flag} {str(folder)!r} cannot be written ({error.strerror or error}).") from None
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return found


def resolved_path(path):
    """A local path made absolute (the same folder named two ways is one setting); a hub id or None unchanged."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def changed_settings(config_file, settings):
    """'key: old on disk, new now; ...' for every setting that differs from those saved in `config_file` (a JSON
    file of a previous run), or '' when none does or there is no such file."""
    if not config_file.is_file():
        return ""
    previous = json.loads(config_file.read_text())
    changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
    return "; ".join(f"{key}: {old!r} on disk, {new!r} now" for key, (old, new) in changed.items())


def check_settings_unchanged(
    config_file, settings, contents, remedy="Use another --output_dir, or delete the folder."
):
    """A resumed folder must have been made with `settings`: InputError '<folder> holds <contents> (<what changed>).
    <remedy>' when the earlier run's `config_file` differs, e.g. contents 'pairs made with other settings'."""
    details = changed_settings(config_file, settings)
    if details:
        raise InputError(f"{config_file.parent} holds {contents} ({details}). {remedy}")


def check_data_file(flag, name):
    """A data file given for `flag` must be one datasets reads (FILE_BUILDERS); folders and hub ids pass."""
    path = Path(name)
    if path.is_file() and path.suffix not in FILE_BUILDERS:
        raise InputError(
            f"{flag} {name!r} is a {path.suffix or 'suffix-less'} file; expected a dataset folder, "
            f"a hub id, or a file ending in one of {sorted(FILE_BUILDERS)}."
        )


def load_table(name, split, cache_dir, flag, expected):
    """A data file (FILE_BUILDERS), dataset folder or hub id as a datasets.Dataset; InputError when it cannot be
    read, naming `flag` and saying what was `expected` (e.g. 'a dataset folder or hub id, or a .parquet file')."""
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            return datasets.load_dataset(
                FILE_BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir
            )
        if path.is_dir():
            # name the data files, so that the cache is keyed on their modification times (see train_mapo_sdxl.py)
            builder = datasets.load_dataset_builder(str(path), cache_dir=cache_dir)
            files = {split_name: list(paths) for split_name, paths in (builder.config.data_files or {}).items()}
            return datasets.load_dataset(str(path), data_files=files or None, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many kinds (missing files, unknown splits, hub offline)
        raise InputError(
            f"{flag} {name!r} (split {split!r}) could not be read "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); expected {expected}."
        ) from error


def safetensors_problem(path):
    """Why `path` is not a whole safetensors file ('empty', 'truncated: ...', 'not a safetensors file: ...'), or None
    when its header parses and the file is as long as the header says. Reads the header only, not the tensors."""
    import struct

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            return f"not a safetensors file ({size} bytes)"
        (header_size,) = struct.unpack("<Q", start)
        if header_size > size - 8:
            return f"not a safetensors file, or truncated (its header claims {header_size} bytes, the file has {size})"
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [
        entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__" and "data_offsets" in entry
    ]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    return None


def check_safetensors(path, what):
    """InputError '<what> <path> is <problem>; ...' when `path` is not a whole safetensors file."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise InputError(
            f"{what} {str(path)!r} is {problem}; expected a whole .safetensors file (copy or save it again)."
        )


def check_safetensors_in(folder, what):
    """check_safetensors for every .safetensors file under a local `folder` (a pipeline, a UNet); a hub id passes."""
    folder = Path(folder)
    if folder.is_dir():
        for path in sorted(folder.rglob("*.safetensors")):
            check_safetensors(path, f"{what}: the weight file")


def image_problem(path):
    """Why the image file `path` is unusable (missing, empty, not an image, truncated), or None when it is whole.

    PIL's verify() reads every chunk and checks its CRC without decoding pixels: cheap enough to run on every image of
    a run before a model loads."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "an empty file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, struct.error, ...
        return f"not a readable image ({type(error).__name__}: {' '.join(str(error).split())[:120]})"
    return None
