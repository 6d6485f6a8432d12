"""Loading a text-to-image pipeline and drawing seeded images with it, the same way in every tool that does.

Used by eval/generate.py, ddspo/generate_pairs.py, mapo/build_pairs.py and mapo/measure_mismatch.py: the sampler
flags (named and defaulted alike), the pipeline with its trained weights, the seed of an image and its generator,
and the split of the work over `accelerate launch`'s processes.
"""

import io
import json
from pathlib import Path

from examples.lib.cli import InputError, finite_float
from examples.lib.files import check_safetensors, resolved_path
from examples.lib.prompts import looks_local
from utils.validation import validation_image_seed


SCHEDULERS = {
    "default": None,  # the pipeline's own (Euler discrete for SDXL base 1.0, flow-matching Euler for SD3)
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",  # CaPO's data and evaluation sampler for SDXL (Appendix B.1)
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    # DPM-Solver++(2M) on the flow's sigmas: CaPO's SD3 sampler (50 steps, guidance 5.0, shift 3.0)
    "flow_dpmpp_2m": "DPMSolverMultistepScheduler",
}
# SANA: flow matching on an AutoencoderDC's latents, prompts read by Gemma2 behind its complex human instruction
SANA_PIPELINES = ("SanaPipeline",)
SANA_SIDE_MULTIPLE = 32  # SanaPipeline refuses other sides
FLOW_PIPELINES = ("StableDiffusion3Pipeline", *SANA_PIPELINES)  # flow matching: velocity prediction, shifted sigmas
FLOW_SCHEDULERS = ("default", "flow_dpmpp_2m")  # the samplers of a flow-matching pipeline
FLOW_PATCH_SIZE = 2  # SD3's transformer patchifies its latents 2x2: the side must be a multiple of 8 x 2
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TEXTUAL_INVERSION_NAME = "textual_inversion.safetensors"  # clip_l, clip_g of train_mapo_personalization_sdxl.py


def add_pipeline_arguments(parser, model_help):
    """The flags of the pipeline to draw with (without trained weights), named as in generate.py."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help=model_help,
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def add_sampling_arguments(parser):
    """The sampler flags, named and defaulted alike in every tool that generates images."""
    parser.add_argument(
        "--scheduler",
        type=str,
        default="default",
        choices=list(SCHEDULERS),
        help="Sampler. default: the pipeline's own (SD3: FlowMatchEulerDiscreteScheduler); flow_dpmpp_2m: "
        "DPM-Solver++(2M) on flow sigmas (use_flow_sigmas, flow_prediction), CaPO's SD3 sampler, for SD3 only; "
        "the others are for SD1.x, SD2.x and SDXL.",
    )
    parser.add_argument(
        "--num_inference_steps", type=int, default=50, help="Sampling steps (50: CaPO's, for SDXL and SD3)."
    )
    parser.add_argument(
        "--guidance_scale", type=finite_float, default=5.0, help="Classifier-free guidance scale (5.0: CaPO's)."
    )
    parser.add_argument(
        "--shift",
        type=finite_float,
        default=None,
        help="SD3 and SANA only: the flow scheduler's shift, sigma <- s sigma / (1 + (s - 1) sigma) (CaPO: 3.0). "
        "Default: the pipeline's scheduler's own (3.0 for SD3, SD3.5 and SANA 1024px: its flow_shift).",
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3 and SANA only: T5 (SANA: Gemma2) tokens of each prompt (at most 512). Default: the pipeline's own "
        "(256; SANA: 300, read behind its complex human instruction).",
    )
    parser.add_argument("--resolution", type=int, default=1024, help="Side of the square images.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call on each process.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Weights and activations precision (default: the accelerate config's).",
    )


def add_trained_weights_arguments(parser):
    """The flags that load trained weights into the pipeline: --lora_path, --lora_scale, --unet_path and
    --transformer_path (examples/eval/generate.py, examples/ddspo/generate_pairs.py)."""
    parser.add_argument(
        "--lora_path",
        type=str,
        default=None,
        help=f"LoRA weights to apply: a training output folder holding {LORA_WEIGHT_NAME}, or a .safetensors file.",
    )
    parser.add_argument(
        "--lora_scale",
        type=finite_float,
        default=1.0,
        help="Scale of the LoRA update when it is fused into the weights.",
    )
    parser.add_argument(
        "--unet_path",
        type=str,
        default=None,
        help="A fine-tuned UNet: a training output folder holding unet/, the unet/ folder itself, "
        "or a hub repository of either kind.",
    )
    parser.add_argument(
        "--transformer_path",
        type=str,
        default=None,
        help="A fine-tuned transformer of a flow pipeline (SD3, SD3.5): a training output folder holding "
        "transformer/ (train_diffusion_dpo_sd3.py's full fine-tuning), the transformer/ folder itself, or a hub "
        "repository of either kind.",
    )


def check_trained_weights(args):
    """Refuse trained weights that cannot load, before any model does: more than one of --lora_path, --unet_path and
    --transformer_path, a path that is not there, a LoRA folder without its weights, a truncated weight file, or
    weights of the other family (a UNet for a flow pipeline, a transformer for a UNet pipeline)."""
    trained = [f"--{flag}" for flag in ("lora_path", "unet_path", "transformer_path") if getattr(args, flag)]
    if len(trained) > 1:
        raise InputError(
            f"Give one of --lora_path, --unet_path, --transformer_path, not {' and '.join(trained)}: each replaces "
            "the base's weights with one trained model's."
        )
    if args.lora_path is not None:
        lora = Path(args.lora_path)
        if lora.is_dir() and not (lora / LORA_WEIGHT_NAME).is_file():
            raise InputError(
                f"--lora_path {args.lora_path!r} is a folder without {LORA_WEIGHT_NAME}; "
                "expected a training output folder or the .safetensors file."
            )
        if not lora.exists():
            raise InputError(f"--lora_path {args.lora_path!r} does not exist.")
        check_safetensors(lora / LORA_WEIGHT_NAME if lora.is_dir() else lora, "--lora_path")
    class_name = local_pipeline_class(args.pretrained_model_name_or_path)
    if class_name in FLOW_PIPELINES and args.unet_path is not None:  # (a hub id is checked by load_pipeline)
        raise InputError(
            f"--unet_path is for UNet pipelines (SD1.x, SD2.x, SDXL), but {args.pretrained_model_name_or_path!r} is "
            f"a {class_name}; give its trained weights as --lora_path or --transformer_path."
        )
    if class_name is not None and class_name not in FLOW_PIPELINES and args.transformer_path is not None:
        raise InputError(
            f"--transformer_path is for flow pipelines (SD3, SD3.5), but {args.pretrained_model_name_or_path!r} is a "
            f"{class_name}; give a fine-tuned UNet as --unet_path."
        )
    for name in ("unet", "transformer"):
        path = getattr(args, f"{name}_path")
        if path is not None and looks_local(path) and not Path(path).expanduser().exists():
            raise InputError(f"--{name}_path {path!r} does not exist.")
        if path is not None and Path(path).exists():
            subfolder = model_subfolder(path, name)  # a hub id is checked when the model loads
            for weights in sorted(Path(path, subfolder or "").glob("*.safetensors")):
                check_safetensors(weights, f"--{name}_path: the weight file")


def trained_weights(args):
    """The trained weights `args` names, as load_pipeline_for's keyword arguments (none for a tool without the
    flags of add_trained_weights_arguments)."""
    weights = {name: getattr(args, name, None) for name in ("lora_path", "unet_path", "transformer_path")}
    weights = {name: path for name, path in weights.items() if path}
    if "lora_path" in weights:
        weights["lora_scale"] = args.lora_scale
    return weights


def trained_weight_settings(args):
    """The trained weights among the settings a resumed folder must match: only those given, with resolved paths,
    so that a folder made without them (or before the flags) resumes."""
    return {
        name: value if name == "lora_scale" else resolved_path(value) for name, value in trained_weights(args).items()
    }


def check_sampling_args(args):
    """Refuse bad sampler flags (those of `add_sampling_arguments`) before any model is loaded."""
    for name in ("num_inference_steps", "batch_size", "resolution"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.resolution % 8 != 0:
        raise InputError(f"--resolution must be a multiple of 8 (the VAE downsamples 8x), got {args.resolution}.")
    if args.shift is not None and args.shift <= 0:
        raise InputError(f"--shift must be positive, got {args.shift}.")
    if args.max_sequence_length is not None and not 0 < args.max_sequence_length <= 512:
        raise InputError(
            f"--max_sequence_length must lie in 1..512 (SD3's T5 limit; SANA reads 300 behind its instruction), got "
            f"{args.max_sequence_length}."
        )
    class_name = local_pipeline_class(args.pretrained_model_name_or_path)
    if class_name is not None:  # a hub id is checked by load_pipeline_for, before its weights load
        check_flags_for_pipeline(class_name, args)


def local_pipeline_class(pretrained_model_name_or_path):
    """The pipeline class a local folder's model_index.json names, or None (a hub id, or no such file)."""
    model_index = Path(pretrained_model_name_or_path) / "model_index.json"
    if not model_index.is_file():
        return None
    try:
        return json.loads(model_index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        return None  # load_pipeline says what is wrong with it


def check_flags_for_pipeline(class_name, args):
    """The sampler flags that belong to one family must fit the pipeline `class_name`: the flow samplers, --shift and
    --max_sequence_length to a flow-matching pipeline (SD3), the DDPM-family samplers to the others."""
    if class_name in FLOW_PIPELINES:
        if args.scheduler not in FLOW_SCHEDULERS:
            raise InputError(
                f"--scheduler {args.scheduler} is a sampler of SD1.x, SD2.x and SDXL; {class_name} is a flow-matching "
                f"pipeline: use one of {', '.join(FLOW_SCHEDULERS)}."
            )
        if class_name in SANA_PIPELINES:
            if args.resolution % SANA_SIDE_MULTIPLE != 0:
                raise InputError(
                    f"--resolution must be a multiple of {SANA_SIDE_MULTIPLE} for {class_name} (the pipeline draws "
                    f"no other sides), got {args.resolution}."
                )
            return
        if args.resolution % (8 * FLOW_PATCH_SIZE) != 0:
            raise InputError(
                f"--resolution must be a multiple of {8 * FLOW_PATCH_SIZE} for {class_name} (the VAE downsamples 8x, "
                f"the transformer takes 2x2 patches), got {args.resolution}."
            )
        return
    given = [flag for flag in ("shift", "max_sequence_length") if getattr(args, flag) is not None]
    if args.scheduler == "flow_dpmpp_2m":
        given.insert(0, "scheduler flow_dpmpp_2m")
    if given:
        raise InputError(
            f"--{', --'.join(given)} {'is' if len(given) == 1 else 'are'} for flow-matching pipelines (SD3), but "
            f"{class_name} is not one; leave {'it' if len(given) == 1 else 'them'} out."
        )


def check_pipeline_path(pretrained_model_name_or_path):
    """A local --pretrained_model_name_or_path must be a pipeline folder; a hub id is checked when it loads."""
    model = Path(pretrained_model_name_or_path)
    if model.is_dir() and not (model / "model_index.json").is_file():
        raise InputError(
            f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r} is a folder without "
            "model_index.json; expected a diffusers pipeline folder (save_pretrained) or a hub id."
        )


def sampler_settings(args, weight_dtype):
    """Everything that changes the pixels of an image drawn with a given prompt and seed by the pipeline the model
    flags name, without trained weights (each tool adds its own settings)."""
    settings = {
        "pretrained_model_name_or_path": resolved_path(args.pretrained_model_name_or_path),
        "pretrained_vae_model_name_or_path": resolved_path(args.pretrained_vae_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "dtype": str(weight_dtype).removeprefix("torch."),
    }
    for flag in ("shift", "max_sequence_length"):  # SD3's; absent when left to the pipeline (earlier folders resume)
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    return settings


def textual_inversion_file(path, lora_path):
    """The embeddings file to load: `path` (a folder holding TEXTUAL_INVERSION_NAME, or the file), else the one
    beside the LoRA weights of a training output folder, else None."""
    if path is None:
        beside_lora = Path(lora_path) / TEXTUAL_INVERSION_NAME if lora_path is not None else None
        return str(beside_lora) if beside_lora is not None and beside_lora.is_file() else None
    candidate = Path(path) / TEXTUAL_INVERSION_NAME if Path(path).is_dir() else Path(path)
    if not candidate.is_file():
        raise InputError(
            f"--textual_inversion_path {path!r}: no such file; expected a training output folder holding "
            f"{TEXTUAL_INVERSION_NAME} or the file."
        )
    return str(candidate)


def load_textual_inversion(pipeline, path):
    """Add the token saved in `path` (its metadata names it) to the SDXL pipeline's two tokenizers and encoders."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as saved:
        token = (saved.metadata() or {}).get("token")
    embeddings = load_file(path)
    if not token or set(embeddings) != {"clip_l", "clip_g"} or type(pipeline).__name__ != "StableDiffusionXLPipeline":
        raise InputError(
            f"{path} is not an SDXL textual-inversion file of train_mapo_personalization_sdxl.py (clip_l and clip_g "
            f"embeddings, the token in its metadata) for this {type(pipeline).__name__}; found keys "
            f"{sorted(embeddings)}."
        )
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        pipeline.load_textual_inversion(
            embeddings[key],
            token=token,
            text_encoder=getattr(pipeline, f"text_encoder{suffix}"),
            tokenizer=getattr(pipeline, f"tokenizer{suffix}"),
        )
    return token


def model_subfolder(path, name="unet"):
    """The subfolder (`name`, or None: the top) holding the config of a fine-tuned UNet or transformer: a training
    output folder, the model's own folder, or such a hub repository."""
    local = Path(path)
    if local.exists():
        has = lambda file: (local / file).is_file()  # noqa: E731
    else:
        from huggingface_hub import file_exists

        has = lambda file: file_exists(path, file)  # noqa: E731
    if has(f"{name}/config.json"):
        return name
    if has("config.json"):
        return None
    raise InputError(
        f"--{name}_path {path!r} holds neither {name}/config.json nor config.json; "
        f"expected a training output folder with {name}/, a {name} folder, or such a hub repository."
    )


def unet_subfolder(unet_path):
    """The subfolder ("unet", or None: the top) with the UNet config of a training output, unet folder or hub repo."""
    return model_subfolder(unet_path, "unet")


# The seed of one image: (i, k) for image k of prompt i in generate.py, the row index for a pair. The training scripts'
# validation by reward seeds its images with the same function, so generate.py redraws what a validation scored.
image_seed = validation_image_seed


def generator_for(seed):
    """A CPU generator, so that an image's starting noise is the same on every device."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def weight_dtype_for(mixed_precision):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def share_of_this_process(accelerator, items):
    """This process's contiguous share of `items` (all of them with one process). Every process must pass the same
    list, so each one lists the work on disk before any of them writes (`accelerator.wait_for_everyone()`)."""
    with accelerator.split_between_processes(items) as share:
        return list(share)


def load_pipeline(
    pretrained_model_name_or_path,
    weight_dtype,
    device,
    scheduler="default",
    shift=None,
    vae_path=None,
    unet_path=None,
    transformer_path=None,
    lora_path=None,
    lora_scale=1.0,
    textual_inversion_path=None,
    revision=None,
    variant=None,
    cache_dir=None,
):
    """The text-to-image pipeline of the family model_index.json names (SDXL, SD1.x, SD2.x, SD3), on `device`.

    `vae_path`, `unet_path` and `transformer_path` (a flow pipeline's, e.g. train_diffusion_dpo_sd3.py's full
    fine-tuning output) replace those components; `lora_path` (a folder with LORA_WEIGHT_NAME, or the file)
    is fused into the weights at `lora_scale`; `textual_inversion_path` adds a trained token (SDXL);
    `scheduler` is a key of SCHEDULERS and `shift` a flow pipeline's scheduler shift (None: its own); for a
    flow-matching pipeline (SD3) "flow_dpmpp_2m" is DPMSolverMultistepScheduler with use_flow_sigmas,
    prediction_type "flow_prediction" and flow_shift = the shift. A local SD folder whose
    model_index.json names a safety checker that is not in the folder is loaded without one.
    """
    import diffusers
    from diffusers import AutoencoderKL, AutoPipelineForText2Image, UNet2DConditionModel

    model_index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    flow = model_index.get("_class_name") in FLOW_PIPELINES
    components = {}
    if vae_path is not None:
        components["vae"] = AutoencoderKL.from_pretrained(vae_path, dtype=weight_dtype, cache_dir=cache_dir)
    if unet_path is not None:
        if "unet" not in model_index:
            raise InputError(
                f"--unet_path was given, but {pretrained_model_name_or_path!r} is a {model_index['_class_name']} "
                "without a UNet; use a UNet pipeline (SD1.x, SD2.x, SDXL)."
            )
        components["unet"] = UNet2DConditionModel.from_pretrained(
            unet_path, subfolder=unet_subfolder(unet_path), dtype=weight_dtype, cache_dir=cache_dir
        )
    if transformer_path is not None:
        if "transformer" not in model_index:
            raise InputError(
                f"--transformer_path was given, but {pretrained_model_name_or_path!r} is a "
                f"{model_index['_class_name']} without a transformer; use a flow pipeline (SD3, SD3.5)."
            )
        components["transformer"] = getattr(diffusers, model_index["transformer"][1]).from_pretrained(
            transformer_path,
            subfolder=model_subfolder(transformer_path, "transformer"),
            dtype=weight_dtype,
            cache_dir=cache_dir,
        )
    local_folder = Path(pretrained_model_name_or_path)
    safety_checker = model_index.get("safety_checker")
    if (
        local_folder.is_dir()
        and safety_checker
        and safety_checker[0]
        and not (local_folder / "safety_checker").is_dir()
    ):
        components.update(safety_checker=None, requires_safety_checker=False)
    pipeline = AutoPipelineForText2Image.from_pretrained(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        dtype=weight_dtype,
        cache_dir=cache_dir,
        **components,
    )
    if flow:
        config = pipeline.scheduler.config
        shift_name = "flow_shift" if config.get("use_flow_sigmas") else "shift"  # SANA's DPM-Solver on flow sigmas
        shift = config.get(shift_name, 1.0) if shift is None else shift
        if scheduler == "flow_dpmpp_2m":
            pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
                config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
            )
        elif shift != config.get(shift_name, 1.0):
            pipeline.scheduler = type(pipeline.scheduler).from_config(config, **{shift_name: shift})
    elif SCHEDULERS[scheduler] is not None:
        pipeline.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipeline.scheduler.config)
    if textual_inversion_path is not None:
        load_textual_inversion(pipeline, textual_inversion_path)
    if lora_path is not None:
        lora = Path(lora_path)
        folder, weight_name = (lora, LORA_WEIGHT_NAME) if lora.is_dir() else (lora.parent, lora.name)
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)
        pipeline.fuse_lora(lora_scale=lora_scale)
        pipeline.unload_lora_weights()  # the update now lives in the fused weights
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def read_model_index(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """The pipeline's model_index.json as a dict (a folder's, or a hub repository's: downloads nothing else)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    except OSError as error:  # no model_index.json: a wrong folder, a wrong hub id, or the hub out of reach
        raise InputError(
            f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r} could not be loaded "
            f"({' '.join(str(error).split())[:200]}); expected a diffusers pipeline folder or a hub id reachable "
            "from here (is HF_HUB_OFFLINE set?)."
        ) from error


def load_pipeline_for(args, weight_dtype, device, **trained_weights):
    """`load_pipeline` with the model flags the tools name alike (--pretrained_model_name_or_path,
    --pretrained_vae_model_name_or_path, --scheduler, --shift, --revision, --variant, --cache_dir); `trained_weights`
    are its unet_path, transformer_path, lora_path, lora_scale and textual_inversion_path. The sampler flags are
    checked against the pipeline's family first (check_flags_for_pipeline: a hub id's model_index.json is read before
    any weights)."""
    model_index = read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    check_flags_for_pipeline(model_index.get("_class_name"), args)
    return load_pipeline(
        args.pretrained_model_name_or_path,
        weight_dtype,
        device,
        scheduler=args.scheduler,
        shift=args.shift,
        vae_path=args.pretrained_vae_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **trained_weights,
    )


def draw(pipeline, prompts, seeds, args, negative_prompts=None):
    """One image per prompt, each from a generator of its own seed, with the sampler flags of `args`; and how many
    the safety checker blacked out."""
    extra = {"negative_prompt": negative_prompts} if negative_prompts is not None else {}
    if args.max_sequence_length is not None:  # SD3's T5 length (check_flags_for_pipeline refused it elsewhere)
        extra["max_sequence_length"] = args.max_sequence_length
    if type(pipeline).__name__ in SANA_PIPELINES:  # at --resolution itself, not at the nearest of SANA's trained sizes
        extra["use_resolution_binning"] = False
    output = pipeline(
        prompt=prompts,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        generator=[generator_for(seed) for seed in seeds],
        **extra,
    )
    flagged = sum(bool(flag) for flag in (getattr(output, "nsfw_content_detected", None) or []))
    return output.images, flagged


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
