#!/usr/bin/env python
r"""Model soup baseline of CaPO (Table 2 "SOUP", Appendix B.2 Eq. 29): SLERP of task vectors over a base UNet.

    python -m examples.capo.soup --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --models capo-mps capo-vqascore capo-aesthetic --output_dir capo-soup

writes `capo-soup/unet/` (a full UNet: `UNet2DConditionModel.from_pretrained("capo-soup", subfolder="unet")`,
or `examples/eval/generate.py --unet_path capo-soup`) and `capo-soup/soup_config.json`.

- Models: each fine-tuned model is a LoRA (`pytorch_lora_weights.safetensors` as the training scripts
  save it, or a training output folder holding it) or a full UNet (a folder with `unet/`, or a folder
  with config.json and diffusion_pytorch_model.safetensors). The base is a pipeline folder (its `unet/`),
  a UNet folder, or a hub pipeline id.
- Task vector of a model: tau_i = theta_i - theta_0, per tensor. A LoRA's is its dense update, per
  adapted layer B @ A * scale with scale = lora_alpha / r (peft's `get_delta_weight`, after diffusers
  reads the file as `load_lora_weights` does: lora_alpha from the file's adapter metadata or kohya
  `.alpha` keys, else alpha = r), and zero elsewhere; it is what `fuse_lora` adds to the base.
- Eq. 29: SLERP(theta_0, theta_1, theta_2, lambda) = theta_0 + sin((1-lambda) Omega)/sin(Omega) tau_1
  + sin(lambda Omega)/sin(Omega) tau_2, Omega the angle between tau_1 and tau_2, per tensor (flattened).
  Lambda weighs the second model. Three models, as the paper merges them: theta_12 = SLERP(theta_0,
  theta_1, theta_2, 1/2), then SLERP(theta_0, theta_12, theta_3, 1/3). We read the second lambda as the
  third model's weight (in the linear limit each model then weighs 1/3, the "uniform weights, 1/3
  each" of §5.2); in general the j-th merge uses lambda = 1/(j+1) unless --lambdas says otherwise.
- Degenerate tensors: where the two task vectors are nearly parallel or antiparallel (sin Omega ~ 0,
  Omega undefined) or one is zero, SLERP falls back to linear interpolation (1-lambda) tau_1 + lambda tau_2,
  its limit for parallel vectors. How many tensors took each path is printed and recorded.
"""

import argparse
import json
import math
from pathlib import Path

from examples.lib.cli import InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, check_safetensors, prepare_output_folder, write_atomically


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
PARALLEL_SIN = 1e-6  # below this sin(Omega), SLERP's coefficients are 0/0: use their limit, lerp
OUTPUT_NAMES = ["unet", "soup_config.json"]  # what a soup writes in --output_dir (--overwrite replaces them)
SAVE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------------------------
# The math: pure functions
# ---------------------------------------------------------------------------------------------------------------


def slerp_coefficients(a, b, weight):
    """(coefficient of a, coefficient of b, path) of Eq. 29 for task vectors a, b (any shape, flattened).

    path: "slerp"; "parallel" (sin Omega below PARALLEL_SIN: lerp); "zero" (a or b is zero: lerp).
    Omega = 2 atan2(|a^ - b^|, |a^ + b^|), accurate near 0 and pi where acos(cos) is not.
    """
    import torch

    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a == 0 or norm_b == 0:
        return 1.0 - weight, weight, "zero"
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = 2.0 * math.atan2(
        torch.linalg.vector_norm(unit_a - unit_b).item(), torch.linalg.vector_norm(unit_a + unit_b).item()
    )
    if math.sin(omega) < PARALLEL_SIN:
        return 1.0 - weight, weight, "parallel"
    return math.sin((1.0 - weight) * omega) / math.sin(omega), math.sin(weight * omega) / math.sin(omega), "slerp"


def slerp(a, b, weight):
    """Spherical interpolation of task vectors a -> b at `weight` (Eq. 29 without theta_0); same shape as a."""
    coefficient_a, coefficient_b, _ = slerp_coefficients(a, b, weight)
    return coefficient_a * a + coefficient_b * b


def default_lambdas(num_models):
    """The paper's pairwise merge: 1/2 for the first two models, then 1/3 for the third (1/(j+1) for the j-th)."""
    return [1.0 / (j + 1) for j in range(1, num_models)]


def merge_task_vectors(task_vectors, lambdas):
    """Fold SLERP over the task vectors of one tensor: tau = slerp(slerp(tau_1, tau_2, l_1), tau_3, l_2) ...
    Returns (merged task vector, [path of each merge])."""
    merged, paths = task_vectors[0], []
    for task_vector, weight in zip(task_vectors[1:], lambdas):
        coefficient_a, coefficient_b, path = slerp_coefficients(merged, task_vector, weight)
        merged = coefficient_a * merged + coefficient_b * task_vector
        paths.append(path)
    return merged, paths


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="Base model theta_0: a pipeline folder (its unet/), a UNet folder, or a hub pipeline id.",
    )
    parser.add_argument(
        "--models",
        type=str,
        nargs="+",
        required=True,
        help="Two or more fine-tuned models, merged in this order: LoRA files or folders, or full UNet folders.",
    )
    parser.add_argument(
        "--lambdas",
        type=finite_float,
        nargs="+",
        default=None,
        help="SLERP coefficient of each merge, weighing the model merged in (default: the paper's 1/2, then 1/3).",
    )
    parser.add_argument(
        "--save_dtype",
        type=str,
        default="fp32",
        choices=sorted(SAVE_DTYPES),
        help="Precision of the saved UNet (default: fp32).",
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Receives unet/ and soup_config.json.")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    if len(args.models) < 2:
        raise InputError(f"--models needs two or more fine-tuned models to merge, got {len(args.models)}.")
    if args.lambdas is None:
        args.lambdas = default_lambdas(len(args.models))
    if len(args.lambdas) != len(args.models) - 1:
        raise InputError(
            f"--lambdas needs one value per merge ({len(args.models) - 1} for {len(args.models)} models), "
            f"got {len(args.lambdas)}."
        )
    if not all(0 < weight < 1 for weight in args.lambdas):
        raise InputError(f"--lambdas must lie strictly between 0 and 1 (Eq. 29), got {args.lambdas}.")
    args.model_kinds = [model_kind(model) for model in args.models]
    base_location(args.pretrained_model_name_or_path)
    prepare_output_folder(args.output_dir, OUTPUT_NAMES, args.overwrite)


def model_kind(path):
    """("lora", file) or ("unet", folder with config.json) for a fine-tuned model given on the command line."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        check_safetensors(path, "Model")
        return "lora", path
    if (path / LORA_WEIGHT_NAME).is_file():
        check_safetensors(path / LORA_WEIGHT_NAME, "Model")
        return "lora", path / LORA_WEIGHT_NAME
    for folder in (path / "unet", path):
        if (folder / "config.json").is_file() and unet_weight_files(folder):
            for file in sorted(set(unet_weight_files(folder).values())):
                check_safetensors(file, "Model")
            return "unet", folder
    if not path.exists():
        raise InputError(f"Model {str(path)!r} does not exist; expected a LoRA file or folder, or a UNet folder.")
    found = sorted(entry.name for entry in path.iterdir())[:8] if path.is_dir() else [path.name]
    raise InputError(
        f"Model {str(path)!r} is neither a LoRA ({LORA_WEIGHT_NAME}, or a .safetensors file) nor a full UNet "
        f"(unet/ or config.json with {UNET_WEIGHT_NAME}); it holds {found}."
    )


def base_location(path):
    """(path, subfolder) of the base UNet; a name that is not on disk is taken as a hub pipeline."""
    folder = Path(path)
    if not folder.exists():
        return str(path), "unet"
    if (folder / "unet" / "config.json").is_file():
        return str(path), "unet"
    if (folder / "config.json").is_file():
        return str(path), None
    raise InputError(
        f"--pretrained_model_name_or_path {str(path)!r} holds neither unet/config.json nor config.json; "
        "expected a diffusers pipeline folder or a UNet folder."
    )


# ---------------------------------------------------------------------------------------------------------------
# Task vectors
# ---------------------------------------------------------------------------------------------------------------


def unet_weight_files(folder):
    """{tensor name: safetensors file} of a UNet folder (one file, or shards with an index); {} when none."""
    folder = Path(folder)
    index = folder / f"{UNET_WEIGHT_NAME}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / UNET_WEIGHT_NAME).is_file():
        from safetensors import safe_open

        check_safetensors(folder / UNET_WEIGHT_NAME, "Model")
        with safe_open(folder / UNET_WEIGHT_NAME, framework="pt") as weights:
            return {name: folder / UNET_WEIGHT_NAME for name in weights.keys()}
    return {}


class FullUNetTaskVector:
    """tau = theta_i - theta_0 of a full UNet folder, read one tensor at a time (SDXL's UNet is 10 GB in fp32)."""

    def __init__(self, folder, base_state):
        from safetensors import safe_open

        self.folder, self.files = Path(folder), unet_weight_files(folder)
        missing, extra = sorted(set(base_state) - set(self.files)), sorted(set(self.files) - set(base_state))
        if missing or extra:
            raise InputError(
                f"The UNet in {self.folder} does not match the base UNet: missing {missing[:5]} ({len(missing)}), "
                f"extra {extra[:5]} ({len(extra)}); fine-tuned models must come from the same base architecture."
            )
        self.handles = {file: safe_open(file, framework="pt") for file in set(self.files.values())}
        for name, tensor in base_state.items():
            shape = tuple(self.handles[self.files[name]].get_slice(name).get_shape())
            if shape != tuple(tensor.shape):
                raise InputError(
                    f"{name} has shape {shape} in {self.folder} but {tuple(tensor.shape)} in the base UNet; "
                    "fine-tuned models must come from the same base architecture."
                )

    def __call__(self, name, base_tensor):
        return self.handles[self.files[name]].get_tensor(name).float() - base_tensor.float()


class LoRATaskVector:
    """tau of a LoRA: B @ A * scale on each adapted layer (its bias update where it has one), zero elsewhere."""

    def __init__(self, lora_file, unet, adapter_name):
        from diffusers import StableDiffusionXLPipeline
        from peft.tuners.lora import LoraLayer

        self.file = Path(lora_file)
        state_dict, network_alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            str(self.file.parent), weight_name=self.file.name, return_lora_metadata=True
        )
        other = sorted({key.split(".")[0] for key in state_dict if not key.startswith("unet.")})
        if other:
            raise InputError(
                f"{self.file} also holds LoRA layers for {other}; the soup merges UNets only. Use a UNet-only LoRA."
            )
        down_weights = ("lora_A.weight", "lora.down.weight", "lora_down.weight")  # peft, diffusers, kohya names
        num_layers = sum(1 for key in state_dict if key.endswith(down_weights))
        unet.load_lora_adapter(
            state_dict, prefix="unet", network_alphas=network_alphas, metadata=metadata, adapter_name=adapter_name
        )
        self.deltas, self.scales = {}, set()
        try:
            for module_name, module in unet.named_modules():
                if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                    continue
                if adapter_name in getattr(module, "lora_variant", {}):
                    raise InputError(f"{self.file} is not plain LoRA (DoRA or another variant); the soup needs B @ A.")
                scale = module.scaling[adapter_name]
                self.scales.add(float(scale))
                self.deltas[f"{module_name}.weight"] = module.get_delta_weight(adapter_name).detach().float()
                if module.lora_bias[adapter_name]:
                    self.deltas[f"{module_name}.bias"] = (module.lora_B[adapter_name].bias * scale).detach().float()
        finally:
            unet.unload_lora()
        adapted = sum(1 for key in self.deltas if key.endswith(".weight"))
        if adapted != num_layers:
            raise InputError(
                f"{self.file} has {num_layers} LoRA layers but only {adapted} match modules of the base UNet; "
                "was it trained on another base model?"
            )

    def __call__(self, name, base_tensor):
        import torch

        if name not in self.deltas:
            return torch.zeros_like(base_tensor, dtype=torch.float32)
        return self.deltas[name].reshape(base_tensor.shape)


def main(args):
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel

    path, subfolder = base_location(args.pretrained_model_name_or_path)
    if Path(path).is_dir():
        for file in sorted(Path(path, subfolder or "").glob("*.safetensors")):
            check_safetensors(file, "--pretrained_model_name_or_path: the base UNet's weight file")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, dtype=torch.float32)
    except OSError as error:
        raise InputError(
            f"Could not load the base UNet from {path!r}: {str(error).strip().splitlines()[0]} "
            "Pass a local pipeline or UNet folder (no hub access with HF_HUB_OFFLINE=1)."
        ) from None

    task_vectors, described = [], []
    for i, (kind, location) in enumerate(args.model_kinds):
        if kind == "lora":  # loaded into the base UNet and removed again before its weights are read
            task_vector = LoRATaskVector(location, unet, adapter_name=f"soup_{i}")
            described.append({"path": str(location), "kind": "lora", "scale": sorted(task_vector.scales)})
        else:
            task_vector = None
            described.append({"path": str(location), "kind": "unet"})
        task_vectors.append(task_vector)
    base_state = unet.state_dict()
    for i, (kind, location) in enumerate(args.model_kinds):
        if kind == "unet":
            task_vectors[i] = FullUNetTaskVector(location, base_state)

    paths = {"slerp": 0, "parallel": 0, "zero": 0}
    num_tensors = 0
    with torch.no_grad():
        for name, base_tensor in base_state.items():
            if not base_tensor.is_floating_point():
                continue
            merged, merge_paths = merge_task_vectors(
                [task_vector(name, base_tensor) for task_vector in task_vectors], args.lambdas
            )
            base_tensor.copy_((base_tensor.float() + merged).to(base_tensor.dtype))  # in place: theta_0 + tau
            for path_taken in merge_paths:
                paths[path_taken] += 1
            num_tensors += 1

    output_dir = Path(args.output_dir)
    if args.save_dtype != "fp32":
        unet.to(getattr(torch, SAVE_DTYPES[args.save_dtype]))
    unet.save_pretrained(output_dir / "unet")
    config = {
        "method": "SLERP of task vectors (CaPO Eq. 29), merged pairwise in the order given",
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "models": described,
        "lambdas": args.lambdas,
        "lambda_reading": "lambda weighs the model merged in: theta_12 = SLERP(theta_0, theta_1, theta_2, 1/2), "
        "then SLERP(theta_0, theta_12, theta_3, 1/3)",
        "fallback": "linear interpolation where sin(Omega) < 1e-6 (parallel or antiparallel) or a task vector is zero",
        "merges_by_path": paths,
        "tensors": num_tensors,
        "save_dtype": args.save_dtype,
        "diffusers_version": diffusers.__version__,
    }
    text = json.dumps(config, indent=2) + "\n"
    write_atomically(output_dir / "soup_config.json", lambda path: path.write_text(text, encoding="utf-8"))
    print(
        f"== soup finished: {len(args.models)} models merged, {num_tensors} tensors x {len(args.lambdas)} merges: "
        f"{paths['slerp']} SLERP, {paths['parallel']} linear (task vectors nearly parallel), {paths['zero']} linear "
        f"(a task vector is zero); UNet in {output_dir / 'unet'}, settings in {output_dir / 'soup_config.json'}",
        flush=True,
    )


if __name__ == "__main__":
    run_tool(main, parse_args)
